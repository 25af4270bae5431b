"""torch.compile(fullgraph=True): both entry points, forward and backward, equal to eager and to the
float64 reference; validation that keeps the graph whole; no host reads in the eager backward of
the fused path; a Hugging Face Trainer step with torch_compile=True.

Compiled functions are built once per module and reused (a new shape, dtype or option recompiles
the same function), and shapes are small: compiling dominates the time of these tests.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ON_CUDA, assert_close, make_inputs, no_host_reads

from gem_kernels import FusedLinearGEMLoss, GEMLoss, fused_linear_gem_loss, gem_loss
from gem_kernels.functional._checks import LABEL_RANGE_MESSAGE
from gem_kernels.reference import gem_loss_reference

REDUCTIONS = [("mean", None), ("sum", None), ("none", None), ("mean", 7), ("mean", "tensor"), ("mean", "tensor0")]


def _all_ignored_if_zero(y, items):
    """num_items_in_batch = 0 means every token of the accumulation window is ignored."""
    return torch.full_like(y, -100) if items == "tensor0" else y


def _num_items(kind):
    if kind == "tensor":
        return torch.tensor(11)
    if kind == "tensor0":
        return torch.tensor(0)
    return kind


def _gem_call(z, y, reduction, num_items, validate_labels=True):
    return gem_loss(
        z,
        y,
        reduction=reduction,
        num_items_in_batch=num_items,
        impl="torch",
        return_ce=True,
        validate_labels=validate_labels,
    )


def _fused_call(x, w, b, y, reduction, num_items):
    return fused_linear_gem_loss(
        x, w, y, b, reduction=reduction, num_items_in_batch=num_items, impl="torch", softcap=20.0
    )


_compiled_gem = torch.compile(_gem_call, fullgraph=True)
_compiled_fused = torch.compile(_fused_call, fullgraph=True)


@pytest.fixture(scope="module", autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(out, inputs, reduction):
    loss = out[0] if isinstance(out, tuple) else out
    # a non-uniform upstream for "none" checks the per-token path
    up = (
        torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
        if reduction == "none"
        else torch.ones((), device=loss.device)
    )
    return torch.autograd.grad(loss, inputs, up)


def _linear_inputs(
    seed, n=20, hidden=24, vocab=257, *, w_scale=0.5, bias=True, ignore=slice(None, None, 4), dtype=torch.float32
):
    """hidden [n, H], weight [V, H] (N(0, 1) * w_scale) and bias [V] (or None), drawn in that order
    from ``seed`` and cast to ``dtype``, all requiring grad; then labels [n] with ``labels[ignore]``
    set to -100. Returns (hidden, weight, bias, labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * w_scale).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[ignore] = -100
    return x, w, b, y


def _float64(*tensors):
    """Float64 leaves holding the same values (the reference's inputs)."""
    return [t.detach().double().requires_grad_() for t in tensors]


def _check_compiled(compiled, eager, reference, inputs, reduction, items, out_names, grad_names):
    """``compiled(*copies of inputs)`` against ``eager(*inputs)``: every output (``out_names``, the
    loss first) to rounding of the compiled reduction, the gradients of ``inputs`` to 1e-7;
    then, unless every token is ignored (items "tensor0": zero loss and gradients), the loss and
    gradients against ``reference`` on float64 copies."""
    what = f"{reduction}/{items}"
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    out_c = compiled(*copies)
    grads_c = _grads(out_c, copies, reduction)
    out_e = eager(*inputs)
    grads_e = _grads(out_e, inputs, reduction)
    outs_c, outs_e = (o if isinstance(o, tuple) else (o,) for o in (out_c, out_e))
    assert len(outs_c) == len(outs_e) == len(out_names), (len(outs_c), len(outs_e), out_names)
    # Same chunked bodies: values equal to rounding of the (compiled) reduction, gradients bitwise.
    for name, c, e in zip(out_names, outs_c, outs_e):
        assert_close(c, e, what=f"{what} compiled vs eager {name}", atol=1e-6, rtol=1e-6)
    for name, gc, ge in zip(grad_names, grads_c, grads_e):
        assert_close(gc, ge, what=f"{what} compiled vs eager {name}", atol=1e-7, rtol=1e-6)
    if items == "tensor0":
        assert outs_c[0].item() == 0.0 and not any(gc.any() for gc in grads_c)
        return
    inputs64 = _float64(*inputs)
    ref = reference(*inputs64)
    grads_ref = _grads(ref, inputs64, reduction)
    assert_close(outs_c[0], ref, what=f"{what} compiled loss vs reference", dtype=torch.float32)
    for name, gc, gr in zip(grad_names, grads_c, grads_ref):
        assert_close(gc, gr, what=f"{what} compiled {name} vs reference", dtype=torch.float32)


@pytest.mark.parametrize("reduction,items", REDUCTIONS)
def test_gem_loss_compiles_fullgraph_and_matches_eager(reduction, items):
    z, y = make_inputs(n=24, vocab=257, seed=1, device="cpu")
    y = _all_ignored_if_zero(y, items)
    n = _num_items(items)
    _check_compiled(
        lambda z: _compiled_gem(z, y, reduction, n),
        lambda z: _gem_call(z, y, reduction, n),
        lambda z: gem_loss_reference(z, y, beta=0.7, reduction=reduction, num_items_in_batch=n),
        [z],
        reduction,
        items,
        ["loss", "ce"],
        ["grad"],
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gem_loss_compiled_low_precision(dtype):
    z, y = make_inputs(n=24, vocab=257, dtype=dtype, seed=2, device="cpu")
    zc = z.detach().clone().requires_grad_()
    loss_c, _ = _compiled_gem(zc, y, "mean", None)
    (g_c,) = torch.autograd.grad(loss_c, zc)
    z64 = z.detach().double().requires_grad_()
    ref = gem_loss_reference(z64, y, beta=0.7)
    (g_ref,) = torch.autograd.grad(ref, z64)
    assert g_c.dtype == dtype
    assert_close(loss_c, ref, what=f"{dtype} compiled loss", dtype=dtype)
    assert_close(g_c, g_ref, what=f"{dtype} compiled grad", dtype=dtype)


@pytest.mark.parametrize("reduction,items", REDUCTIONS)
def test_fused_compiles_fullgraph_and_matches_eager(reduction, items):
    x, w, b, y = _linear_inputs(3)
    y = _all_ignored_if_zero(y, items)
    n = _num_items(items)
    _check_compiled(
        lambda x, w, b: _compiled_fused(x, w, b, y, reduction, n),
        lambda x, w, b: _fused_call(x, w, b, y, reduction, n),
        lambda x, w, b: gem_loss_reference(
            x @ w.T + b, y, beta=0.7, reduction=reduction, num_items_in_batch=n, softcap=20.0
        ),
        [x, w, b],
        reduction,
        items,
        ["loss"],
        ["grad_x", "grad_w", "grad_b"],
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_low_memory_compiles_fullgraph_and_matches_eager(reduction):
    """low_memory=True travels through the custom operators (eager and deferred gradients)."""
    x, w, _, y = _linear_inputs(5, bias=False)

    def call(x, w, y):
        return fused_linear_gem_loss(x, w, y, reduction=reduction, impl="torch", low_memory=True)

    xc, wc = (t.detach().clone().requires_grad_() for t in (x, w))
    out_c = torch.compile(call, fullgraph=True)(xc, wc, y)
    grads_c = _grads(out_c, (xc, wc), reduction)
    out_e = fused_linear_gem_loss(x, w, y, reduction=reduction, impl="torch")
    grads_e = _grads(out_e, (x, w), reduction)
    assert_close(out_c, out_e, what=f"{reduction} low_memory compiled vs eager loss", atol=1e-6, rtol=1e-6)
    for name, gc, ge in zip("xw", grads_c, grads_e):
        assert_close(gc, ge, what=f"{reduction} low_memory compiled vs eager grad_{name}", atol=1e-6, rtol=1e-5)


def test_fused_compiled_all_ignored_deferred():
    """reduction='none' (gradients deferred to backward) with every label ignored: zeros, no NaN."""
    x, w = torch.randn(20, 24, requires_grad=True), torch.randn(257, 24, requires_grad=True)
    b = torch.randn(257, requires_grad=True)
    y = torch.full((20,), -100)
    out = _compiled_fused(x, w, b, y, "none", None)
    grads = _grads(out, (x, w, b), "none")
    assert not out.any() and not any(g.any() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_compiled_low_precision(dtype):
    """bf16: gradients precomputed in the forward, rescaled in fp32; fp16: deferred to backward."""
    x, w, b, y = _linear_inputs(4, ignore=slice(1, None, 3), dtype=dtype)
    loss = _compiled_fused(x, w, b, y, "mean", 9)
    grads = torch.autograd.grad(loss * 3.0, (x, w, b))  # an upstream factor != 1
    x64, w64, b64 = _float64(x, w, b)
    ref = gem_loss_reference(x64 @ w64.T + b64, y, beta=0.7, num_items_in_batch=9, softcap=20.0)
    grads_ref = torch.autograd.grad(ref * 3.0, (x64, w64, b64))
    assert_close(loss, ref, what=f"{dtype} compiled fused loss", dtype=dtype)
    for name, gc, gr in zip("xwb", grads, grads_ref):
        assert gc.dtype == dtype
        assert_close(gc, gr, what=f"{dtype} compiled fused grad_{name}", dtype=dtype)


def test_no_graph_breaks_reported_by_explain():
    """torch._dynamo.explain over both entry points and the modules: one graph, zero breaks."""
    z, y = make_inputs(n=12, vocab=65, seed=5, device="cpu")
    x, w = torch.randn(12, 8, requires_grad=True), torch.randn(65, 8, requires_grad=True)

    def step(z, x, w, y):
        a = GEMLoss(impl="torch", h="logsigmoid")(z, y, num_items_in_batch=torch.tensor(5))
        b = FusedLinearGEMLoss(impl="torch", reduction="sum")(x, w, y)
        return a + b

    report = torch._dynamo.explain(step)(z, x, w, y)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_compiled_inplace_backward_leaves_logits():
    """inplace_backward is not applied under compile: the gradient is right and the logits untouched."""
    z, y = make_inputs(n=24, vocab=257, seed=6, device="cpu")
    before = z.detach().clone()
    f = torch.compile(lambda z, y: gem_loss(z, y, impl="torch", inplace_backward=True), fullgraph=True)
    (g,) = torch.autograd.grad(f(z, y), z)
    (g_e,) = torch.autograd.grad(gem_loss(z, y, impl="torch"), z)
    assert torch.equal(z.detach(), before)
    assert_close(g, g_e, what="inplace under compile", atol=1e-7, rtol=1e-6)


@pytest.mark.skipif(
    ON_CUDA, reason="the CPU interpreter variant; on CUDA test_fused_triton_compiles_fullgraph_on_cuda covers it"
)
def test_fused_triton_under_compile_runs_opaque():
    """The fused operator is opaque, so impl='triton' compiles on CPU too: its kernels run (in the
    interpreter) inside the operator, never traced."""
    x, w, _, y = _linear_inputs(7, n=10, hidden=16, vocab=65, w_scale=1.0, bias=False, ignore=3)
    f = torch.compile(lambda x, w, y: fused_linear_gem_loss(x, w, y, impl="triton"), fullgraph=True)
    loss = f(x, w, y)
    grads = torch.autograd.grad(loss, (x, w))
    x64, w64 = _float64(x, w)
    ref = gem_loss_reference(x64 @ w64.T, y, beta=0.7)
    grads_ref = torch.autograd.grad(ref, (x64, w64))
    assert_close(loss, ref, what="fused triton compiled loss", dtype=torch.float32)
    for name, gc, gr in zip("xw", grads, grads_ref):
        assert_close(gc, gr, what=f"fused triton compiled grad_{name}", dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Validation under compile


def test_bad_labels_under_compile_raise_a_clear_error():
    z, y = make_inputs(n=24, vocab=257, seed=1, requires_grad=False, device="cpu")
    bad = y.clone()
    bad[5] = 257
    with pytest.raises(RuntimeError, match=LABEL_RANGE_MESSAGE + r".*\[0, 257\)"):
        _compiled_gem(z, bad, "mean", None)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 257\).*found 257"):  # eager: names the value
        _gem_call(z, bad, "mean", None)
    neg = y.clone()
    neg[0] = -1
    f = torch.compile(lambda x, w, y: fused_linear_gem_loss(x, w, y, impl="torch"), fullgraph=True)
    with pytest.raises(RuntimeError, match=LABEL_RANGE_MESSAGE):
        f(torch.randn(24, 8), torch.randn(257, 8), neg)


def test_negative_num_items_tensor_under_compile():
    z, y = make_inputs(n=24, vocab=257, seed=1, requires_grad=False, device="cpu")
    with pytest.raises(RuntimeError, match="num_items_in_batch must be >= 0"):
        _compiled_gem(z, y, "mean", torch.tensor(-3))


def test_validate_labels_false_skips_the_check():
    """validate_labels=False: no check in eager or compiled code (the caller vouches for the labels)."""
    z, y = make_inputs(n=24, vocab=257, seed=1, requires_grad=False, device="cpu")
    good = gem_loss(z, y, impl="torch")
    assert torch.equal(gem_loss(z, y, impl="torch", validate_labels=False), good)
    bad = y.clone()
    bad[5] = 1000
    gem_loss(z, bad, impl="torch", validate_labels=False)  # no error: out of range is the caller's risk
    f = torch.compile(lambda z, y: gem_loss(z, y, impl="torch", validate_labels=False), fullgraph=True)
    f(z, bad)
    report = torch._dynamo.explain(lambda z, y: gem_loss(z, y, impl="torch", validate_labels=False))(z, y)
    assert not any("_assert_async" in str(node.target) for gm in report.graphs for node in gm.graph.nodes)
    with pytest.raises(TypeError, match="validate_labels must be a bool"):
        gem_loss(z, y, validate_labels=1)
    with pytest.raises(TypeError, match="validate_labels must be a bool"):
        FusedLinearGEMLoss(validate_labels="no")
    assert GEMLoss(validate_labels=False)(z, bad.clamp(max=-100).clamp(min=-100)).item() == 0.0


# ------------------------------------------------------------------------------------------------
# No host reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_eager_backward_reads_nothing_on_the_host(dtype):
    """The eager fused backward rescales its precomputed gradients by a 0-d device tensor (the
    Python-float factor it used to read is gone); values stay those of a float factor."""
    x, w, _, y = _linear_inputs(8, w_scale=1.0, bias=False, ignore=slice(None, None, 3), dtype=dtype)
    loss = fused_linear_gem_loss(x, w, y, impl="torch", num_items_in_batch=torch.tensor(12))
    with no_host_reads():
        (loss / 3.0).backward()
    x64, w64 = _float64(x, w)
    ref = gem_loss_reference(x64 @ w64.T, y, beta=0.7, num_items_in_batch=12) / 3.0
    ref.backward()
    assert_close(x.grad, x64.grad, what=f"{dtype} grad_hidden", dtype=dtype)
    assert_close(w.grad, w64.grad, what=f"{dtype} grad_weight", dtype=dtype)


def test_torch_path_eager_backward_reads_nothing_on_the_host():
    z, y = make_inputs(n=24, vocab=257, seed=9, device="cpu")
    loss = gem_loss(z, y, impl="torch")
    with no_host_reads():
        loss.backward()
    assert z.grad is not None


# ------------------------------------------------------------------------------------------------
# GPU: the Triton logits path traced through its triton_op kernels


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: the Triton interpreter cannot be traced, so the triton_op kernels are compiled only on a GPU",
)
@pytest.mark.parametrize("reduction,items", REDUCTIONS)
def test_gem_loss_triton_compiles_fullgraph_on_cuda(reduction, items):
    z, y = make_inputs(n=64, vocab=1001, seed=10, device="cuda")
    n = _num_items(items)
    n = n.cuda() if isinstance(n, torch.Tensor) else n
    f = torch.compile(
        lambda z, y, r, n: gem_loss(z, y, reduction=r, num_items_in_batch=n, impl="triton"), fullgraph=True
    )
    zc = z.detach().clone().requires_grad_()
    out_c = f(zc, y, reduction, n)
    (g_c,) = _grads(out_c, (zc,), reduction)
    out_e = gem_loss(z, y, reduction=reduction, num_items_in_batch=n, impl="triton")
    (g_e,) = _grads(out_e, (z,), reduction)
    assert_close(out_c, out_e, what="triton compiled vs eager loss", atol=1e-6, rtol=1e-6)
    assert_close(g_c, g_e, what="triton compiled vs eager grad", atol=1e-7, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_triton_compiles_fullgraph_on_cuda():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 64, generator=g).cuda().bfloat16().requires_grad_()
    w = (torch.randn(1001, 64, generator=g) * 0.3).cuda().bfloat16().requires_grad_()
    y = torch.randint(0, 1001, (96,), generator=g).cuda()
    y[::5] = -100
    f = torch.compile(lambda x, w, y: fused_linear_gem_loss(x, w, y, impl="triton"), fullgraph=True)
    loss = f(x, w, y)
    grads = torch.autograd.grad(loss, (x, w))
    x64, w64 = _float64(x, w)
    ref = gem_loss_reference(x64 @ w64.T, y, beta=0.7)
    grads_ref = torch.autograd.grad(ref, (x64, w64))
    assert_close(loss, ref, what="cuda fused compiled loss", dtype=torch.bfloat16)
    for name, gc, gr in zip("xw", grads, grads_ref):
        assert_close(gc, gr, what=f"cuda fused compiled grad_{name}", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Trainer: TrainingArguments(torch_compile=True) on CPU (inductor)


def test_gem_trainer_torch_compile_matches_eager(tmp_path):
    """GEMTrainer (apply_gem's fused path inside the model's forward) with torch_compile=True: two
    SGD steps of a tiny Llama equal the same steps in eager mode (logged losses, CE, parameters)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_integrations_transformers import ListDataset, make_batch, make_trainer, tiny_model, trainer_args

    def run(compile_: bool):
        model, batch = tiny_model("llama"), make_batch(n=4)
        args = trainer_args(tmp_path / str(compile_), 2, 1, steps=2, torch_compile=compile_)
        args.learning_rate = 0.1
        trainer = make_trainer("gem_trainer", model, args, ListDataset(batch))
        trainer.train()
        if compile_:
            assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
        logs = [(h["loss"], h["ce"]) for h in trainer.state.log_history if "loss" in h]
        return logs, {k: p.detach().clone() for k, p in model.named_parameters()}

    torch._dynamo.reset()
    logs_e, params_e = run(False)
    logs_c, params_c = run(True)
    assert len(logs_c) == 2
    for (le, ce_e), (lc, ce_c) in zip(logs_e, logs_c):
        assert abs(le - lc) <= 1e-5 * max(1.0, abs(le)) and abs(ce_e - ce_c) <= 1e-5 * max(1.0, abs(ce_e))
    for name, p in params_c.items():
        assert_close(p, params_e[name], what=f"compiled trainer step: {name}", atol=1e-6, rtol=1e-5)


def test_host_reading_operators_are_tagged_cudagraph_unsafe():
    """The operators that read the valid-token count on the host carry the tag that makes inductor
    keep them out of captured CUDA graphs (mode="reduce-overhead"); the backward of the torch path
    reads nothing and stays capturable."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("torch without the cudagraph_unsafe tag")
    ops = torch.ops.gem_kernels
    for op in (ops.gem_torch_fwd, ops.fused_linear_gem_fwd, ops.fused_linear_gem_bwd):
        assert torch.Tag.cudagraph_unsafe in op.default.tags, op
    assert torch.Tag.cudagraph_unsafe not in ops.gem_torch_bwd.default.tags


def test_impl_choice_under_compile_on_cpu():
    """Under compile, impl='auto' on CPU tensors takes the torch path even with TRITON_INTERPRET=1
    (set by conftest); an explicit impl='triton' for the logits path is refused with a clear message."""
    z, y = make_inputs(n=12, vocab=65, seed=12, device="cpu")
    loss = torch.compile(lambda z, y: gem_loss(z, y), fullgraph=True)(z, y)
    assert_close(loss, gem_loss(z, y, impl="torch"), what="auto under compile", atol=1e-6, rtol=1e-6)
    with pytest.raises(Exception, match="needs CUDA tensors"):
        torch.compile(lambda z, y: gem_loss(z, y, impl="triton"), fullgraph=True)(z, y)


def test_apply_gem_model_forward_is_one_graph():
    """A model patched by apply_gem, in training with labels: the transformer, the head interception
    and the fused loss (with its ce output) trace as one graph with no break."""
    pytest.importorskip("transformers")
    from test_integrations_transformers import make_batch, tiny_model

    from gem_kernels.integrations.transformers import apply_gem

    model, batch = tiny_model("llama"), make_batch(n=2)
    apply_gem(model, impl="torch", return_ce=True)
    model.train()

    def step(ids, mask, labels):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(7))
        return out.loss, out.ce

    report = torch._dynamo.explain(step)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
