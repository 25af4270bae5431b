"""The two Triton designs of gem_loss: gradient in forward (gem_fwd_grad + device-side upstream
scaling) and statistics-only forward + 2-D backward. Which one runs when, that both match the
float64 reference for every option, and what each moves through memory (interpreter byte counter)."""

import pytest
import torch
from helpers import assert_close, check_gem_against_reference, fresh, make_inputs, no_host_reads, run_gem

from benchmarks.traffic import count_traffic
from gem_kernels import fused_linear_gem_loss, gem_loss, ops
from gem_kernels.reference import gem_loss_reference

KERNELS = ("gem_forward", "gem_forward_grad", "gem_backward", "gem_scale_rows")


@pytest.fixture
def launches(monkeypatch):
    """Records the names of the kernel launchers called (the autograd layer imports them from
    gem_kernels.ops at call time)."""
    calls = []
    for name in KERNELS:
        fn = getattr(ops, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    return calls


OPTIONS = {
    "linear": {},
    "logsigmoid": {"h": "logsigmoid"},
    "softcap+scale": {"logit_scale": 1.3, "softcap": 5.0},
    "zloss+ce": {"z_loss_scale": 1e-2, "return_ce": True, "h": "logsigmoid"},
    "everything": {
        "beta": 0.5,
        "h": "logsigmoid",
        "logit_scale": 0.8,
        "softcap": 4.0,
        "z_loss_scale": 1e-2,
        "return_ce": True,
    },
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
@pytest.mark.parametrize("path", ["grad_in_forward", "split"])
def test_both_designs_match_reference(launches, path, options, dtype):
    logits, labels = make_inputs(n=9, vocab=1000, dtype=dtype, seed=3)
    if path == "grad_in_forward":
        check_gem_against_reference(logits, labels, "triton", **OPTIONS[options])
        assert "gem_forward_grad" in launches and "gem_backward" not in launches, launches
    else:
        check_gem_against_reference(
            logits, labels, "triton", reduction="none", upstream=torch.linspace(-1.0, 2.0, 9), **OPTIONS[options]
        )
        assert "gem_forward_grad" not in launches and "gem_backward" in launches, launches


@pytest.mark.parametrize("vocab", [1, 17, 1000, 4097])
@pytest.mark.parametrize("path", ["grad_in_forward", "split"])
def test_odd_vocab_sizes_both_designs(path, vocab):
    logits, labels = make_inputs(n=6, vocab=vocab, dtype=torch.bfloat16, seed=vocab)
    kw = dict(h="logsigmoid", return_ce=True, z_loss_scale=1e-3)
    if path == "split":
        kw["reduction"] = "none"
    check_gem_against_reference(logits, labels, "triton", upstream=1.0, **kw)


@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("sum", None), ("mean", 7), ("mean", "tensor")])
@pytest.mark.parametrize("upstream", [1.0, 0.25, -3.0])
def test_reductions_and_upstream_factors(launches, reduction, num_items, upstream):
    """The gradient is computed with the reduction's token weight in forward; a non-unit upstream
    (e.g. a loss divided by the accumulation steps) is applied in backward by gem_scale_rows."""
    if num_items == "tensor":
        num_items = torch.tensor(5)
    logits, labels = make_inputs(lead=(3, 4), vocab=300, dtype=torch.float32)
    check_gem_against_reference(
        logits, labels, "triton", upstream=upstream, reduction=reduction, num_items_in_batch=num_items, return_ce=True
    )
    assert launches.count("gem_forward_grad") == 1 and "gem_scale_rows" in launches, launches


@pytest.mark.parametrize("path", ["grad_in_forward", "split"])
@pytest.mark.parametrize("upstream", [1.0, 2.0])
def test_inplace_both_designs(path, upstream):
    logits, labels = make_inputs(n=8, vocab=999, dtype=torch.bfloat16)
    kw = dict(h="logsigmoid", softcap=6.0, z_loss_scale=1e-3)
    if path == "split":
        kw["reduction"] = "none"
    check_gem_against_reference(logits, labels, "triton", inplace=True, upstream=upstream, **kw)


def test_inplace_gradient_in_forward_overwrites_at_forward_and_guards_other_users():
    logits, labels = make_inputs(n=6, vocab=200, requires_grad=False)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1
    loss = gem_loss(x, labels, impl="triton", inplace_backward=True)
    assert not torch.equal(x.detach(), logits), "the logits should already hold the gradient"
    # Another autograd node that saved the logits must not silently use the gradient as logits.
    leaf2 = logits.clone().requires_grad_()
    y = leaf2 * 1
    other = (y * y).sum()  # MulBackward saves y
    loss2 = gem_loss(y, labels, impl="triton", inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss2 + other).backward()
    loss.backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("case", ["all_ignored", "minus_inf"])
@pytest.mark.parametrize("path", ["grad_in_forward", "split"])
def test_ignored_rows_and_masked_vocabulary(path, case):
    logits, labels = make_inputs(n=6, vocab=600, ignore_frac=0.0, requires_grad=False)
    if case == "all_ignored":
        labels = torch.full_like(labels, -100)
        logits[0, 5] = 1e4  # ignored rows are never read: no overflow reaches the gradient
    else:
        logits[:, 500:] = float("-inf")
        labels = labels % 500
    kw = dict(return_ce=True, z_loss_scale=1e-3, h="logsigmoid")
    if path == "split":
        kw["reduction"] = "none"
    x = logits.clone().requires_grad_()
    out = gem_loss(x, labels, impl="triton", **kw)
    out[0].sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(o).all() for o in out)
    if case == "all_ignored":
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
        assert all(torch.equal(o, torch.zeros_like(o)) for o in out)
    else:
        assert torch.equal(x.grad[:, 500:], torch.zeros_like(x.grad[:, 500:]))
        ref = fresh(logits[:, :500], torch.float64).requires_grad_()
        r = gem_loss_reference(ref, labels, h="logsigmoid", z_loss_scale=1e-3, reduction=kw.get("reduction", "mean"))
        r.sum().backward()
        assert_close(x.grad[:, :500], ref.grad, what="grad with -inf logits")


def test_which_path_runs_when(launches):
    logits, labels = make_inputs(n=5, vocab=100)

    def run(x, backward=True, **kw):
        launches.clear()
        loss = gem_loss(x, labels, impl="triton", **kw)
        if backward:
            loss.sum().backward()
        return list(launches)

    assert run(fresh(logits)) == ["gem_forward_grad", "gem_scale_rows"]
    assert run(fresh(logits), reduction="sum") == ["gem_forward_grad", "gem_scale_rows"]
    assert run(fresh(logits), reduction="none") == ["gem_forward", "gem_backward"]
    assert run(fresh(logits, torch.float16)) == ["gem_forward", "gem_backward"]  # fp16: upstream before rounding
    with torch.no_grad():
        assert run(fresh(logits), backward=False) == ["gem_forward"]
    assert run(logits.detach(), backward=False) == ["gem_forward"]  # no gradient needed


def test_second_backward_is_a_clear_error_and_none_supports_retain_graph():
    """A reduced loss has its gradient computed in forward (one backward, as impl='torch'); the split
    design (reduction='none') supports repeated backward."""
    logits, labels = make_inputs(n=4, vocab=50)
    x = fresh(logits)
    loss = gem_loss(x, labels, impl="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    y = fresh(logits)
    per_token = gem_loss(y, labels, impl="triton", reduction="none")
    per_token.sum().backward(retain_graph=True)
    first = y.grad.clone()
    per_token.sum().backward()
    assert_close(y.grad, 2 * first, what="accumulated second backward (split design)")


def _passes(rep, nv_bytes):
    return rep.loaded_bytes / nv_bytes, rep.reread_bytes / nv_bytes, rep.stored_bytes / nv_bytes


def test_traffic_of_the_two_designs():
    """Bytes the kernels request, as passes over the bf16 logits (N = 8, V = 5,003, no ignored row):
    gradient in forward = a read, a re-read of the same row by the same program (L2 on a GPU) and a
    write in forward, and only scalars in backward when the upstream is 1; split = a read in forward,
    a read and a write in backward. The rest (labels, per-row statistics) is below 1%."""
    logits, labels = make_inputs(n=8, vocab=5003, dtype=torch.bfloat16, ignore_frac=0.0, requires_grad=False)
    nv = logits.numel() * logits.element_size()
    small = 0.01

    x = fresh(logits).requires_grad_()
    fwd = count_traffic(gem_loss, x, labels, impl="triton")
    bwd = count_traffic(fwd.result.backward)
    load, reread, store = _passes(fwd, nv)
    assert 2.0 <= load <= 2.0 + small and 1.0 <= reread <= 1.0 + small and 1.0 <= store <= 1.0 + small, (
        load,
        reread,
        store,
    )
    load, reread, store = _passes(bwd, nv)
    assert load <= small and store == 0, (load, store)  # upstream exactly 1: no pass over the gradient

    x = fresh(logits).requires_grad_()
    loss = gem_loss(x, labels, impl="triton")
    bwd = count_traffic((loss * 2.0).backward)
    load, reread, store = _passes(bwd, nv)
    assert 1.0 <= load <= 1.0 + small and 1.0 <= store <= 1.0 + small, (load, store)

    x = fresh(logits).requires_grad_()
    fwd = count_traffic(gem_loss, x, labels, impl="triton", reduction="none")
    bwd = count_traffic(fwd.result.sum().backward)
    load, reread, store = _passes(fwd, nv)
    assert 1.0 <= load <= 1.0 + small and reread <= small and store <= small, (load, reread, store)
    load, reread, store = _passes(bwd, nv)
    assert 1.0 <= load <= 1.0 + small and reread <= small and 1.0 <= store <= 1.0 + small, (load, reread, store)

    with torch.no_grad():
        fwd = count_traffic(gem_loss, fresh(logits), labels, impl="triton")
    load, reread, store = _passes(fwd, nv)
    assert 1.0 <= load <= 1.0 + small and reread <= small and store <= small, (load, reread, store)


def test_fused_path_uses_one_kernel_per_chunk(launches):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    weight = (torch.randn(300, 16, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, 300, (20,), generator=g)
    labels[::4] = -100
    fused_linear_gem_loss(hidden, weight, labels, chunk_size=6, impl="triton").backward()
    assert set(launches) == {"gem_forward_grad"} and len(launches) == 3, launches  # 15 valid rows / 6
    launches.clear()
    fused_linear_gem_loss(hidden, weight, labels, chunk_size=6, impl="triton", reduction="none").sum().backward()
    assert "gem_forward_grad" not in launches and "gem_backward" in launches, launches


def test_row_config_pruning():
    """The autotuner's candidates: the logits' element size, blocks no longer than the row, and a
    single one under the interpreter (nothing to time)."""
    from gem_kernels.ops import config
    from gem_kernels.ops.gem_fwd import _gem_fwd_kernel

    prune = _gem_fwd_kernel.early_config_prune
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        first = next(c for c in config.FORWARD_CONFIGS if c.element_size == size)
        for V, block in ((128_256, first.block_v), (3000, 4096), (1, 16)):
            kept = prune(_gem_fwd_kernel.configs, {"logits_ptr": torch.empty(1, dtype=dtype), "V": V})
            assert len(kept) == 1
            c = kept[0]
            assert c.num_warps == first.num_warps
            assert c.kwargs["BLOCK_V"] == min(block, first.block_v)
            assert c.kwargs["LANES"] == min(first.lanes, c.kwargs["BLOCK_V"])


@pytest.mark.parametrize("upstream", [1.0, 0.5])
def test_gradient_in_forward_reads_nothing_on_the_host(upstream):
    """Forward (label check off) and backward of the gradient-in-forward path: the token weight and
    the upstream check stay on the device (the interpreter itself copies to the host; Tensor
    conversions such as .item() are what is refused)."""
    logits, labels = make_inputs(n=8, vocab=300, seed=4)
    x = fresh(logits)
    with no_host_reads():
        loss = gem_loss(x, labels, impl="triton", validate_labels=False, num_items_in_batch=5)
        (loss * upstream).backward()
    _, truth = run_gem(fresh(logits, torch.float64), labels, "reference", upstream=upstream, num_items_in_batch=5)
    assert_close(x.grad, truth, what="gradient without host reads")


@pytest.mark.parametrize("path", ["grad_in_forward", "split"])
def test_metrics_ties_in_one_lane_and_across_lanes(path):
    """return_metrics' arg-max from the per-lane row pass: equal maxima in the same lane (tile rows
    and blocks apart) and in different lanes go to the lowest index, in both designs."""
    V = 9000
    z = torch.randn(4, V)
    pairs = [(7, 7 + 1024), (5, 5 + 8192), (3000, 3001), (0, V - 1)]
    for row, (a, b) in enumerate(pairs):
        z[row, a] = z[row, b] = 10.0
    kw = dict(reduction="sum" if path == "grad_in_forward" else "none", return_metrics=True)
    for labels, want in ((torch.tensor([a for a, _ in pairs]), 1.0), (torch.tensor([b for _, b in pairs]), 0.0)):
        x = z.clone().requires_grad_()
        loss, m = gem_loss(x, labels, impl="triton", **kw)
        loss.sum().backward()
        assert torch.equal(m["token_accuracy"].reshape(-1).sum(), torch.tensor(4 * want)), (path, labels, m)
        ref = gem_loss_reference(z.double(), labels, reduction="sum", return_metrics=True)[1]
        assert_close(m["entropy"].sum(), ref["entropy"].float(), what=f"entropy ({path})")
