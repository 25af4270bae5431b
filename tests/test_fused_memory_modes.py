"""The fused path's memory modes: the default's d weight sums (never the fp32 sums and their cast
together) and the opt-in ``low_memory=True`` (no weight-sized buffer besides the gradient), each
checked against the float64 reference and for its peak memory on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, only_on
from test_fused_linear import _check, linear_inputs

from benchmarks.measure import count_flops
from gem_kernels import FusedLinearGEMLoss, fused_linear_gem_loss
from gem_kernels.autograd._fused_accumulate import Accumulator
from gem_kernels.autograd._scale import SCALE_SLICE

CPU_MEMORY = only_on(
    "cpu",
    "counts CPU allocations from profiler events (oneDNN scratch left out); the GPU "
    "figures are benchmarks/fused_memory.py's and the lm_head-step benchmark's",
)
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul"}


def peak_without_blas_scratch(fn):
    """(peak bytes, largest allocation) of the tensors ``fn`` holds, from torch.profiler memory
    events, with each matmul's internal workspace left out: the events inside a matmul op are
    replaced by their net (its output, if it allocates one). On CPU, oneDNN's bf16 / fp16 GEMMs
    allocate and free packing buffers proportional to their operands inside the call; on CUDA the
    cuBLAS workspace is a persistent per-handle buffer, so this is what a GPU would count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    windows = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in MATMULS]
    trace, pending, current = [], 0, None
    for e in events:
        if e.name() != "[memory]":
            continue
        t = e.start_ns()
        inside = next((w for w in windows if w[0] <= t <= w[1]), None)
        if current is not None and inside != current:
            trace.append(pending)
            pending, current = 0, None
        if inside is None:
            trace.append(e.nbytes())
        else:
            current, pending = inside, pending + e.nbytes()
    if current is not None:
        trace.append(pending)
    cur = peak = largest = 0
    for n in trace:
        cur += n
        peak = max(peak, cur)
        largest = max(largest, n)
    return peak, largest


def _problem(n=64, hidden=256, vocab=1500, dtype=torch.bfloat16, frac=0.5, seed=21):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: int(n * frac)]] = -100
    return x, w, labels


def _measure(x, w, labels, **kw):
    def step():
        fused_linear_gem_loss(x, w, labels, **kw).backward()

    step()  # warm-up (first interpreted Triton calls keep buffers alive below Python)
    x.grad = w.grad = None
    return peak_without_blas_scratch(step)


@CPU_MEMORY
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_peak_is_two_weights_not_three(impl, dtype):
    """2-byte weight: the returned gradient's storage holds half of the fp32 sums and one more
    weight-sized fp32 buffer the other half. Before, an fp32 [V, H] buffer (2 x the weight's bytes)
    and its cast (1 x) coexisted: measured 3.04 x the weight (at H = 256), the largest allocation 2 x."""
    x, w, labels = _problem(n=64, hidden=2048, vocab=1500, dtype=dtype)
    chunk = 8
    peak, largest = _measure(x, w, labels, impl=impl, chunk_size=chunk)
    W, gx = w.numel() * 2, x.numel() * 2
    logits = chunk * w.shape[0] * 2
    # a chunk of logits, the low-precision product of one vocabulary slice (<= a chunk), the first
    # slab of the final conversion (<= 1/16 of W), the fp32 slice with which backward rescales the
    # precomputed gradients (autograd/_scale.py), the torch path's fp32 working blocks (a few
    # chunks' worth), O(tokens) bookkeeping
    allowance = (
        2 * logits
        + W // 16
        + min(SCALE_SLICE, w.numel()) * 4
        + (8 * logits if impl == "torch" else 0)
        + 64 * x.shape[0] * 8
    )
    assert allowance < W  # so the bound below excludes the old layout (3 x W + gx)
    assert peak <= 2 * W + gx + allowance, (peak / W, allowance / W)
    assert largest <= W, largest / W  # no fp32 [V, H] buffer (2 x W)


@CPU_MEMORY
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    "dtype,frac", [(torch.bfloat16, 0.5), (torch.bfloat16, 0.0), (torch.float32, 0.3), (torch.float16, 0.9)]
)
def test_low_memory_peak(impl, dtype, frac):
    """low_memory=True: the gradients themselves plus 5/8 of grad_hidden (the vocabulary slices,
    and the gathered valid rows) or the first pass's logits chunk, plus O(tokens)."""
    if impl == "triton" and dtype != torch.bfloat16:
        pytest.skip("one dtype suffices for the interpreted kernels")
    x, w, labels = _problem(n=64, hidden=2048, vocab=1500, dtype=dtype, frac=frac)
    chunk = 8
    peak, largest = _measure(x, w, labels, impl=impl, chunk_size=chunk, low_memory=True)
    isz = x.element_size()
    W, gx = w.numel() * isz, x.numel() * isz
    first_pass = chunk * w.shape[0] * isz * (5 if impl == "torch" else 1)  # + the torch path's fp32 blocks
    second_pass = gx * 5 // 8 * (5 if impl == "torch" else 1)
    allowance = 64 * x.shape[0] * 8 + 4 * chunk * x.shape[1] * isz
    if isz == 2:  # the fp32 slice with which backward rescales the precomputed gradients
        allowance += min(SCALE_SLICE, w.numel()) * 4
    if impl == "triton":  # the interpreter's fp32 host copies of a slice in and out (not GPU behaviour)
        allowance += 4 * second_pass
    assert peak <= W + gx + max(first_pass, second_pass) + allowance, (peak / W, first_pass / W, second_pass / W)
    assert largest <= W


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frac", [0.0, 0.3, 0.8], ids=["all-valid", "all-rows", "gathered"])
def test_low_memory_values_and_grads(impl, dtype, frac):
    """Against gem_loss_reference(hidden @ W.T + b) in float64, every gradient. frac picks the
    second pass's layout: all valid; 70 % valid (all rows, zero dZ at ignored ones); 20 % valid
    (valid rows gathered). Odd V = 101: the last vocabulary slice is narrower."""
    x, w, b, labels = linear_inputs(lead=(40,), ignore_frac=frac, seed=5)
    _check(impl, dtype, x, w, b, labels, chunk_size=7, low_memory=True)


def test_low_memory_float64_and_default_chunking():
    x, w, b, labels = linear_inputs(dtype=torch.float64, seed=6)
    _check("torch", torch.float64, x, w, b, labels, low_memory=True)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction,nib", [("mean", None), ("sum", None), ("none", None), ("mean", 37)])
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
def test_low_memory_reductions_and_options(impl, reduction, nib, h):
    """Every reduction (none: random per-token upstream, the deferred backward), logsigmoid (which
    reads t_y from the statistics on slices that do not hold the label), softcap, z-loss, CE."""
    x, w, b, labels = linear_inputs(lead=(2, 3, 5), seed=7)
    upstream = torch.randn(labels.shape, dtype=torch.float64) if reduction == "none" else None
    extras = dict(softcap=4.0, logit_scale=0.5, z_loss_scale=1e-2) if impl == "torch" else {}
    _check(
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
        h=h,
        low_memory=True,
        **extras,
    )


@pytest.mark.parametrize(
    "grads",
    [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True)],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_memory_requires_grad_combinations(grads, reduction):
    x, w, b, labels = linear_inputs(seed=8)
    upstream = torch.rand(labels.shape, dtype=torch.float64) if reduction == "none" else None
    _check(
        "torch",
        torch.float32,
        x,
        w,
        b,
        labels,
        grads=grads,
        reduction=reduction,
        upstream=upstream,
        chunk_size=6,
        low_memory=True,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_low_memory_all_ignored(reduction):
    x, w, b, labels = linear_inputs(seed=9)
    labels.fill_(-100)
    xs, ws = x.float().requires_grad_(), w.float().requires_grad_()
    loss = fused_linear_gem_loss(xs, ws, labels, impl="torch", reduction=reduction, low_memory=True)
    loss.sum().backward()
    assert torch.all(loss == 0) and not torch.isnan(xs.grad).any()
    assert torch.all(xs.grad == 0) and torch.all(ws.grad == 0)


def test_low_memory_matmul_flops():
    """Valid rows gathered (25 % valid): 8 x valid x H x V with both gradients (the logits twice);
    6 with the weight gradient only; 4 with the hidden gradient only (no second pass); 10 for
    reduction='none' (the forward's loss-only pass, then both passes in backward). 2/3 valid: the
    second pass runs over all tokens (4 x tokens x H x V)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 8, generator=g).to(DEVICE)
    w = torch.randn(200, 8, generator=g).to(DEVICE)
    labels = torch.randint(0, 200, (48,), generator=g).to(DEVICE)

    def flops(labels, gx, gw, reduction="mean"):
        xs, ws = x.clone().requires_grad_(gx), w.clone().requires_grad_(gw)

        def step():
            fused_linear_gem_loss(
                xs, ws, labels, impl="triton", reduction=reduction, chunk_size=10, low_memory=True
            ).sum().backward()

        return count_flops(step)

    sparse = labels.clone()
    sparse[torch.arange(48, device=DEVICE) % 4 != 0] = -100
    hvd = int((sparse != -100).sum()) * 8 * 200
    assert flops(sparse, True, True) == 8 * hvd
    assert flops(sparse, False, True) == 6 * hvd
    assert flops(sparse, True, False) == 4 * hvd
    assert flops(sparse, True, True, "none") == 10 * hvd
    assert flops(sparse, False, True, "none") == 6 * hvd  # no first pass in backward without d hidden
    dense = labels.clone()
    dense[::3] = -100
    hvd = int((dense != -100).sum()) * 8 * 200
    assert flops(dense, True, True) == 4 * hvd + 4 * 48 * 8 * 200


def test_low_memory_option_checks_and_module():
    x, w, b, labels = linear_inputs(seed=10)
    with pytest.raises(TypeError, match="low_memory must be a bool"):
        fused_linear_gem_loss(x.float(), w.float(), labels, low_memory=1)
    with pytest.raises(TypeError, match="low_memory must be a bool"):
        FusedLinearGEMLoss(low_memory="yes")
    mod = FusedLinearGEMLoss(beta=0.7, low_memory=True, impl="torch")
    a = mod(x.float(), w.float(), labels, b.float())
    ref = fused_linear_gem_loss(x.float(), w.float(), labels, b.float(), impl="torch")
    torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("V,H", [(1, 3), (2, 1), (7, 5), (101, 16), (1000, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulator_in_place_conversion(V, H, dtype):
    """The returned gradient equals the fp32 sums cast once (bit for bit), for odd V and odd V x H
    (the storage is padded to an even count), after several chunks."""
    g = torch.Generator().manual_seed(V * 31 + H)
    w = torch.empty(V, H, dtype=dtype)
    acc = Accumulator(w, None, True, False, chunk_rows=4)
    want = torch.zeros(V, H, dtype=torch.float32)
    for _ in range(3):
        dz = torch.randn(4, V, generator=g).to(dtype)
        x = torch.randn(4, H, generator=g).to(dtype)
        acc.add(dz, x)
        for i in range(V):  # the same fp32 sums of low-precision products, slice by slice
            want[i] += (dz[:, i : i + 1].t() @ x)[0].float()
    got, _ = acc.result()
    assert got.shape == (V, H) and got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
