"""fused_linear_gem_loss against gem_loss_reference(hidden @ W.T + b) in float64, plus the
memory / FLOP properties the fused path exists for."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DEVICE, assert_close, only_on

from benchmarks.measure import count_flops, peak_memory
from gem_kernels import FusedLinearGEMLoss, fused_linear_gem_loss
from gem_kernels.reference import gem_loss_reference

IMPLS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def linear_inputs(
    lead=(24,),
    hidden=16,
    vocab=101,
    *,
    dtype=torch.float32,
    ignore_frac=0.3,
    bias=True,
    scale=3.0,
    seed=0,
    ignore_index=-100,
):
    """hidden [*lead, H] and weight [V, H] (logits ~ N(0, scale^2)), bias [V] or None, labels [*lead]
    with about ``ignore_frac`` ignored, on the test device. Float tensors are returned in float64
    (the truth's inputs); ``_leaf`` makes the dtype-cast copies the code under test sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * (scale / hidden**0.5)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, tuple(lead), generator=g)
    if ignore_frac > 0:
        labels[torch.rand(tuple(lead), generator=g) < ignore_frac] = ignore_index
    # Round the truth's inputs to the tested dtype so both sides see the same numbers.
    x, w = x.to(dtype).double(), w.to(dtype).double()
    b = b.to(dtype).double().to(DEVICE) if b is not None else None
    return x.to(DEVICE), w.to(DEVICE), b, labels.to(DEVICE)


def _leaf(t, dtype, requires_grad=True):
    return None if t is None else t.detach().to(dtype).requires_grad_(requires_grad)


def _forward_backward(fn, x, w, b, labels, dtype, *, grads=(True, True, True), upstream=None, **kw):
    """Run fn on dtype-cast leaves; return (loss, ce or None, [grad_x, grad_w, grad_b])."""
    xs, ws, bs = _leaf(x, dtype, grads[0]), _leaf(w, dtype, grads[1]), _leaf(b, dtype, grads[2])
    out = fn(xs, ws, labels, bs, **kw)
    loss, ce = out if isinstance(out, tuple) else (out, None)
    if any(t is not None and t.requires_grad for t in (xs, ws, bs)):
        up = torch.ones_like(loss) if upstream is None else upstream.to(loss.device, loss.dtype)
        loss.backward(up)
    return loss, ce, [None if t is None else t.grad for t in (xs, ws, bs)]


def _reference(x, w, labels, b=None, **kw):
    return gem_loss_reference(torch.nn.functional.linear(x, w, b), labels, **kw)


def _check(
    impl, dtype, x, w, b, labels, *, grads=(True, True, True), upstream=None, chunk_size=None, low_memory=False, **kw
):
    """Compare impl in dtype against the float64 truth, bounded by the same-dtype PyTorch error."""
    loss, ce, g = _forward_backward(
        fused_linear_gem_loss,
        x,
        w,
        b,
        labels,
        dtype,
        grads=grads,
        upstream=upstream,
        impl=impl,
        chunk_size=chunk_size,
        low_memory=low_memory,
        **kw,
    )
    t_loss, t_ce, t_g = _forward_backward(
        _reference, x, w, b, labels, torch.float64, grads=grads, upstream=upstream, **kw
    )
    if dtype == torch.float64:
        base_loss, base_ce, base_g = t_loss, t_ce, t_g
    else:
        base_loss, base_ce, base_g = _forward_backward(
            _reference, x, w, b, labels, dtype, grads=grads, upstream=upstream, **kw
        )
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, t_loss, what=f"loss ({impl})", dtype=dtype, baseline=base_loss)
    if kw.get("return_ce"):
        assert not ce.requires_grad
        assert_close(ce, t_ce, what=f"ce ({impl})", dtype=dtype, baseline=base_ce)
    for name, a, t, base, need in zip(("grad_hidden", "grad_weight", "grad_bias"), g, t_g, base_g, grads):
        if t is None or not need:
            assert a is None, f"{name} should not be computed"
            continue
        assert a is not None and a.dtype == dtype, f"{name}: missing or wrong dtype"
        assert_close(a, t, what=f"{name} ({impl})", dtype=dtype, baseline=base)
    return loss, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_grads_per_dtype(impl, dtype):
    x, w, b, labels = linear_inputs(dtype=dtype)
    _check(impl, dtype, x, w, b, labels, chunk_size=5)


def test_float64_torch_impl_exact():
    x, w, b, labels = linear_inputs(dtype=torch.float64)
    _check("torch", torch.float64, x, w, b, labels, chunk_size=7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize(
    "extras",
    [
        dict(),
        dict(logit_scale=0.5, softcap=4.0),
        dict(z_loss_scale=1e-2, return_ce=True),
        dict(beta=1.0, logit_scale=2.0, softcap=10.0, z_loss_scale=1e-3, return_ce=True),
    ],
    ids=["plain", "scale+softcap", "zloss+ce", "all"],
)
def test_options(impl, h, extras):
    x, w, b, labels = linear_inputs(lead=(3, 7), seed=1)
    _check(impl, torch.float32, x, w, b, labels, h=h, chunk_size=4, **extras)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "reduction,nib", [("mean", None), ("sum", None), ("none", None), ("mean", 37), ("mean", "tensor")]
)
def test_reductions(impl, reduction, nib):
    x, w, b, labels = linear_inputs(lead=(2, 3, 5), seed=2)
    if nib == "tensor":
        nib = torch.tensor(19.0)
    # reduction="none": a random per-token upstream gradient (the deferred, recomputing backward).
    upstream = torch.randn(labels.shape, dtype=torch.float64) if reduction == "none" else None
    loss, _ = _check(
        impl,
        torch.float32,
        x,
        w,
        b,
        labels,
        reduction=reduction,
        num_items_in_batch=nib,
        upstream=upstream,
        return_ce=True,
        chunk_size=3,
    )
    assert loss.shape == (labels.shape if reduction == "none" else ())


@pytest.mark.parametrize("impl", IMPLS)
def test_scaled_upstream_of_reduced_loss(impl):
    """Backward of a reduced loss only rescales the precomputed gradients: by upstream / (1 / count)."""
    x, w, b, labels = linear_inputs(seed=3)
    _check(impl, torch.float32, x, w, b, labels, upstream=torch.tensor(-2.5, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grads", [g for g in itertools.product([False, True], repeat=3) if any(g)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_combinations(impl, grads, reduction):
    x, w, b, labels = linear_inputs(seed=4)
    upstream = torch.rand(labels.shape, dtype=torch.float64) if reduction == "none" else None
    _check(impl, torch.float32, x, w, b, labels, grads=grads, reduction=reduction, upstream=upstream, chunk_size=6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 5, 17, 1000, None])
def test_chunk_sizes(impl, chunk_size):
    x, w, b, labels = linear_inputs(seed=5, ignore_frac=0.5, bias=False)
    _check(impl, torch.float32, x, w, b, labels, chunk_size=chunk_size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead", [(24,), (2, 3, 4), (1, 1, 5)])
def test_leading_shapes_and_no_ignored(impl, lead):
    x, w, b, labels = linear_inputs(lead=lead, ignore_frac=0.0, seed=6)
    _check(impl, torch.float32, x, w, b, labels, chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(impl, reduction):
    x, w, b, labels = linear_inputs(lead=(2, 5))
    labels.fill_(-100)
    loss, g = _check(impl, torch.float32, x, w, b, labels, reduction=reduction, return_ce=True)
    assert not loss.isnan().any() and (loss == 0).all()
    for t in g:
        assert (t == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    x, w, b, labels = linear_inputs(lead=(0,))
    loss, g = _check(impl, torch.float32, x, w, b, labels)
    assert loss.item() == 0.0 and g[0].shape == (0, x.shape[-1])


@pytest.mark.parametrize("impl", IMPLS)
def test_custom_ignore_index_and_noncontiguous_hidden(impl):
    x, w, b, labels = linear_inputs(lead=(6, 4), seed=7, ignore_index=3)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    assert not xt.is_contiguous()
    _check(impl, torch.float32, xt, w, b, labels, ignore_index=3, chunk_size=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_weight(impl):
    """One Parameter used as the input embedding and as the lm_head: both gradients add up."""
    V, H = 53, 8
    g = torch.Generator().manual_seed(8)
    w64 = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (3, 5), generator=g).to(DEVICE)
    labels = torch.randint(0, V, (3, 5), generator=g)
    labels[0, :2] = -100
    labels = labels.to(DEVICE)
    proj64 = (torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5).to(DEVICE)

    def model(w, proj, fn, **kw):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, w) @ proj)
        return fn(hidden, w, labels, **kw)

    grads = {}
    for name, dtype, fn, kw in [
        ("ours", torch.float32, fused_linear_gem_loss, dict(impl=impl, chunk_size=4)),
        ("truth", torch.float64, _reference, {}),
        ("base", torch.float32, _reference, {}),
    ]:
        emb = torch.nn.Embedding(V, H, dtype=dtype, device=DEVICE)
        with torch.no_grad():
            emb.weight.copy_(w64)
        proj = proj64.to(dtype).clone().requires_grad_()
        model(emb.weight, proj, fn, **kw).backward()
        grads[name] = (emb.weight.grad, proj.grad)
    for i, what in enumerate(["tied weight grad", "upstream layer grad"]):
        assert_close(grads["ours"][i], grads["truth"][i], what=what, dtype=torch.float32, baseline=grads["base"][i])


def test_module_matches_functional_and_rejects_unknown_options():
    x, w, b, labels = linear_inputs(lead=(4, 5), seed=9)
    mod = FusedLinearGEMLoss(beta=0.5, h="logsigmoid", impl="torch", chunk_size=3)
    assert "beta=0.5" in repr(mod)
    got = mod(x.float(), w.float(), labels, b.float(), num_items_in_batch=11)
    want = _reference(x, w, labels, b, beta=0.5, h="logsigmoid", num_items_in_batch=11)
    assert_close(got, want, what="module loss", dtype=torch.float32)
    with pytest.raises(TypeError, match="inplace_backward"):
        FusedLinearGEMLoss(inplace_backward=True)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearGEMLoss(beta=0)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_no_grad_and_no_mutation(impl):
    x, w, b, labels = linear_inputs(seed=10)
    xs, ws, bs = x.float().requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_()
    before = [t.detach().clone() for t in (xs, ws, bs, labels)]
    with torch.no_grad():
        loss = fused_linear_gem_loss(xs, ws, labels, bs, impl=impl)
    assert not loss.requires_grad
    assert_close(loss, _reference(x, w, labels, b), what="no-grad loss", dtype=torch.float32)
    fused_linear_gem_loss(xs, ws, labels, bs, impl=impl, chunk_size=3).backward()
    for t, t0 in zip((xs, ws, bs, labels), before):
        assert torch.equal(t.detach(), t0), "an input was modified"


def test_second_backward_of_reduced_loss_is_refused():
    x, w, b, labels = linear_inputs()
    loss = fused_linear_gem_loss(x.float(), w.float().requires_grad_(), labels, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(hidden=torch.zeros(4, 7)),
            ValueError,
            r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 7",
        ),
        (dict(weight=torch.zeros(5, 8, 1)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.zeros(0, 8)), ValueError, "at least one row"),
        (dict(bias=torch.zeros(6)), ValueError, r"bias must have shape \(5,\)"),
        (dict(weight=torch.zeros(5, 8, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
        (dict(bias=torch.zeros(5, dtype=torch.float16)), TypeError, "bias must have the dtype of hidden"),
        (dict(hidden=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "hidden must have dtype"),
        (dict(weight=torch.zeros(5, 8, device="meta")), ValueError, "weight must be on the device of hidden"),
        (dict(bias=torch.zeros(5, device="meta")), ValueError, "bias must be on the device of hidden"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.tensor([0, 1, 5, -100])), ValueError, r"labels must lie in \[0, 5\)"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have at least one dimension"),
        (dict(weight="W"), TypeError, "weight must be a torch.Tensor"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(impl="cuda"), ValueError, "impl must be one of"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(inplace_backward=True), TypeError, "inplace_backward"),
        (dict(reduction="sum", num_items_in_batch=4), ValueError, "num_items_in_batch"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(
        hidden=torch.zeros(4, 8), weight=torch.zeros(5, 8), labels=torch.tensor([0, 1, 4, -100]), bias=torch.zeros(5)
    )
    for k in list(kwargs):
        if k in args:
            args[k] = kwargs.pop(k)
    with pytest.raises(exc, match=match):
        kwargs.setdefault("impl", "torch")
        fused_linear_gem_loss(args["hidden"], args["weight"], args["labels"], args["bias"], **kwargs)


def test_triton_impl_rejects_float64():
    x, w, b, labels = linear_inputs(dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='triton' supports"):
        fused_linear_gem_loss(x, w, labels, b, impl="triton")


# --- the properties the fused path exists for -------------------------------------------------


def _memory_problem(n=256, hidden=32, vocab=1000, dtype=torch.float32, seed=11):
    """hidden [n, H], weight [V, H] requiring grad; labels with exactly half ignored (test device)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: n // 2]] = -100
    return x, w, labels.to(DEVICE)


def _fwd_bwd(fn, x, w, labels, **kw):
    def step():
        fn(x, w, labels, **kw).backward()

    return step


CPU_MEMORY = only_on(
    "cpu",
    "its bounds are calibrated to CPU allocations (profiler events, oneDNN scratch); "
    "GPU memory is measured by python -m benchmarks",
)


@CPU_MEMORY
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_one_chunk_plus_gradients(impl, dtype):
    x, w, labels = _memory_problem(n=256, hidden=16, vocab=1000, dtype=dtype)
    n_tok, vocab = labels.shape[0], w.shape[0]
    n_valid = int((labels != -100).sum())
    chunk = 16
    step = _fwd_bwd(fused_linear_gem_loss, x, w, labels, impl=impl, chunk_size=chunk)
    step()  # warm-up (see test_peak_memory_not_above_liger_fused_linear_ce)
    x.grad = w.grad = None
    rep = peak_memory(step)
    item = x.element_size()
    grads = (x.numel() + w.numel()) * item
    chunk_logits = chunk * vocab * item
    # Low precision: the fp32 weight accumulator, plus the low-precision product of a vocabulary
    # slice that is added into it (at most a chunk's worth of elements).
    fp32_acc = w.numel() * 4 + chunk_logits if dtype != torch.float32 else 0
    # O(tokens) terms (labels, indices, per-token loss/stats, a chunk's rows) and the torch path's
    # fp32 working blocks (at most a chunk each here, a few of them) are the allowance on top.
    allowance = 64 * n_tok * 8 + 2 * chunk * x.shape[1] * item + (4 * chunk * vocab * 4 if impl == "torch" else 0)
    # CPU BLAS scratch of a bf16 GEMM (oneDNN packs operands in fp32). Measured for a [16, K] x [K, n]
    # product: 136,832 B at K=1000 (n <= 16), 1.40 MB at K=32000, n=256; grows with K (= V here).
    scratch = 16384 + (max((chunk * vocab + w.numel()) * 4, 160 * vocab) if dtype != torch.float32 else 0)
    assert rep.peak_bytes <= grads + fp32_acc + chunk_logits + allowance + scratch, rep.mib()
    # largest: the fp32 weight accumulator, an fp32 working copy of one chunk (torch path), or BLAS scratch
    assert rep.largest_alloc_bytes <= max(w.numel() * 4, chunk * vocab * 4, scratch), rep.mib()
    assert rep.largest_alloc_bytes < n_valid * vocab * item  # never a [tokens, V] tensor
    assert x.grad is not None and w.grad is not None


@CPU_MEMORY
def test_peak_memory_not_above_liger_fused_linear_ce():
    """Same shape, same measurement: forward + backward peak of ours (default chunking) <= Liger's
    fused linear cross-entropy (its Triton kernel interpreted on CPU). The full-size comparison
    (4096 tokens, H=256, V=32000) is benchmarks/fused_memory.py."""
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    x, w, labels = _memory_problem(n=128, hidden=64, vocab=500)
    ours = (fused_linear_gem_loss, dict(impl="triton"))
    theirs = (liger.liger_fused_linear_cross_entropy, {})
    # Warm-up both: a first interpreted call leaves a chunk-sized buffer alive (not a Python object;
    # held below the Triton interpreter) that a later call frees, inside the other's window.
    wx, ww, wl = _memory_problem(n=8, hidden=64, vocab=500, seed=12)
    for fn, kw in (ours, theirs):
        _fwd_bwd(fn, wx, ww, wl, **kw)()
    reports = []
    for fn, kw in (ours, theirs):
        x.grad = w.grad = None
        reports.append(peak_memory(_fwd_bwd(fn, x, w, labels, **kw)))
    assert reports[0].peak_bytes <= reports[1].peak_bytes, f"ours: {reports[0].mib()}; liger: {reports[1].mib()}"


@pytest.mark.parametrize(
    "grads,bias",
    [
        ((True, True), False),
        ((True, True), True),
        ((True, False), True),
        ((False, True), False),
        ((False, False), True),
    ],
)
def test_matmul_flops(grads, bias):
    """Matmul FLOPs over every ATen matmul (incl. in-place addmm_) = (2 + 2 per requested hidden /
    weight gradient) x valid_tokens x H x V: 6 with both. The bias gradient is a column sum, no
    matmul. With impl='triton' the GEM part runs in kernels; the torch path adds the row-dot bmm
    of its GEM forward (2 x valid x V)."""
    x, w, labels = _memory_problem(n=48, hidden=8, vocab=200)
    x.requires_grad_(grads[0])
    w.requires_grad_(grads[1])
    b = torch.zeros(w.shape[0], device=DEVICE, requires_grad=True) if bias else None
    n_valid = int((labels != -100).sum())
    hvd = n_valid * w.shape[1] * w.shape[0]
    want = (2 + 2 * grads[0] + 2 * grads[1]) * hvd

    def step(impl):
        loss = fused_linear_gem_loss(x, w, labels, b, impl=impl, chunk_size=10)
        if loss.requires_grad:
            loss.backward()

    assert count_flops(step, "triton") == want
    assert count_flops(step, "torch") == want + 2 * n_valid * w.shape[0]


def test_reduction_none_costs_one_extra_logits_matmul():
    x, w, labels = _memory_problem(n=48, hidden=8, vocab=200)
    n_valid = int((labels != -100).sum())

    def step():
        fused_linear_gem_loss(x, w, labels, impl="triton", reduction="none", chunk_size=10).sum().backward()

    assert count_flops(step) == 8 * n_valid * w.shape[1] * w.shape[0]


def test_double_backward_is_refused():
    x, w, b, labels = linear_inputs()
    xs = x.float().requires_grad_()
    loss = fused_linear_gem_loss(xs, w.float(), labels, impl="torch", reduction="none").sum()
    (g,) = torch.autograd.grad(loss, xs, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_the_head_in_the_autocast_dtype(impl):
    """Under torch.autocast(bfloat16) fp32 hidden/weight are cast as F.linear would; fp32 leaves get
    fp32 gradients; the result matches the float64 truth on bf16-rounded inputs as closely as
    plain PyTorch under the same autocast."""
    x, w, b, labels = linear_inputs(dtype=torch.bfloat16, seed=13)
    grads = {}
    for name, fn, kw, dtype, amp in [
        ("ours", fused_linear_gem_loss, dict(impl=impl, chunk_size=5), torch.float32, True),
        ("base", _reference, {}, torch.float32, True),
        ("truth", _reference, {}, torch.float64, False),
    ]:
        xs, ws, bs = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            loss = fn(xs, ws, labels, bs, **kw)
            loss.backward()  # inside the autocast block on purpose: backward must not be autocast
        grads[name] = (loss, xs.grad, ws.grad, bs.grad)
    assert all(g.dtype == torch.float32 for g in grads["ours"][1:])
    # Same numbers as calling it on bf16 tensors without autocast: the head ran in bf16, and
    # nothing inside (e.g. the torch path's fp32 bmm) was autocast.
    xb, wb, bb = _leaf(x, torch.bfloat16), _leaf(w, torch.bfloat16), _leaf(b, torch.bfloat16)
    fused_linear_gem_loss(xb, wb, labels, bb, impl=impl, chunk_size=5).backward()
    for got, want in zip(grads["ours"][1:], (xb.grad, wb.grad, bb.grad)):
        assert torch.equal(got, want.float())
    assert torch.equal(grads["ours"][0], fused_linear_gem_loss(xb, wb, labels, bb, impl=impl, chunk_size=5))
    for i, what in enumerate(["loss", "grad_hidden", "grad_weight", "grad_bias"]):
        assert_close(
            grads["ours"][i],
            grads["truth"][i],
            what=f"autocast {what}",
            dtype=torch.bfloat16,
            baseline=grads["base"][i],
        )


def _no_grad_strided_fp16_inputs():
    """The inputs of the three tests below, drawn in one sequence from one seed: hidden [32, 16],
    weight [300, 16] and labels [32] (a strided view); then hidden [512, 16], weight [2000, 16] and
    labels [512] for the fp16 gradient test."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(32, 16, generator=g).to(DEVICE)
    weight = torch.nn.Parameter((torch.randn(300, 16, generator=g) / 4).to(DEVICE))
    labels = torch.randint(0, 300, (32, 2), generator=g).to(DEVICE)[:, 1]
    hidden16 = torch.randn(512, 16, generator=g).to(DEVICE)
    weight16 = torch.randn(2000, 16, generator=g).to(DEVICE)
    labels16 = torch.randint(0, 2000, (512,), generator=g).to(DEVICE)
    return (hidden, weight, labels), (hidden16, weight16, labels16)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_grad_runs_only_the_loss_matmul(impl):
    """Under no_grad only the loss matmul runs, even when hidden and weight require grad."""
    (hidden, weight, labels), _ = _no_grad_strided_fp16_inputs()
    with torch.no_grad():
        flops = count_flops(fused_linear_gem_loss, hidden.requires_grad_(), weight, labels, impl=impl)
    # the logits matmul only (+ the torch path's row-dot in its GEM forward)
    assert flops == 2 * 32 * 16 * 300 + (2 * 32 * 300 if impl == "torch" else 0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_strided_labels_are_read_correctly(impl):
    (hidden, weight, labels), _ = _no_grad_strided_fp16_inputs()
    assert not labels.is_contiguous()
    loss = fused_linear_gem_loss(hidden, weight, labels, impl=impl)
    ref = gem_loss_reference(hidden.double() @ weight.double().T, labels)
    assert_close(loss, ref, what="fused loss with strided labels")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fp16_gradients_keep_a_gradscaler_factor_without_underflow(impl):
    """fp16 gradients carry a GradScaler-sized upstream factor without underflow: 512 tokens and
    spread-out logits, so dZ / n_valid would underflow fp16 without the scale."""
    _, (hidden, weight, labels) = _no_grad_strided_fp16_inputs()
    h16, w16 = hidden.half().requires_grad_(), weight.half().requires_grad_()
    (fused_linear_gem_loss(h16, w16, labels, impl=impl) * 65536.0).backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (gem_loss_reference(h64 @ w64.T, labels) * 65536.0).backward()
    for got, want, name in ((h16.grad, h64.grad, "hidden"), (w16.grad, w64.grad, "weight")):
        zeroed = int(((got == 0) & (want.abs() > 1e-3)).sum())
        assert zeroed == 0, f"fp16 {name} grad: {zeroed} entries underflowed to 0"
        # fp16 matmuls of rounded dZ: allow fp16-sized error relative to the gradient's scale
        assert_close(got, want, what=f"fp16 {name} grad x 65536", atol=2e-3 * float(want.abs().max()), rtol=1e-2)
