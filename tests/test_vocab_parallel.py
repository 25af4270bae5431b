"""Vocabulary-parallel gem_loss with real torch.distributed (gloo, CPU, 127.0.0.1 only).

Each launch spawns `world` processes that run every case in a fixed order (so the collectives line
up), compare each rank's loss and gradient shard with single-process gem_loss on the concatenated
logits and with the float64 reference, and write their failures to a file the parent reads.
Spawning is slow, so there is one launch per world size and many cases per launch.
"""

from __future__ import annotations

import os

# conftest.py already chose: "1" on the CPU test device (inherited by the children), "0" on CUDA, where
# this module is skipped; setdefault only matters when the module is run without conftest.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import assert_close, make_inputs, only_on, run_on_ranks  # noqa: E402

pytestmark = only_on(
    "cpu",
    "gloo process groups of CPU processes, whose impl='triton' cases need the Triton "
    "interpreter; a GPU run would need NCCL and one GPU per rank",
)

# Uneven shard sizes per world size; their sum is the global vocabulary.
SHARDS = {2: [13, 24], 3: [5, 20, 12]}

# (name, options): each runs with both impls and reduction="none" under a random upstream gradient
# (per-token losses and gradients); the reductions are local and run on top of ZLOSS_CE below.
OPTION_CASES = [
    ("linear", dict()),
    ("logsigmoid", dict(h="logsigmoid", beta=0.5)),
    ("softcap_scale_logsig", dict(h="logsigmoid", softcap=4.0, logit_scale=1.3)),
    ("zloss_ce", dict(z_loss_scale=0.05, return_ce=True, logit_scale=0.7)),
    ("ce_softcap_beta1", dict(return_ce=True, softcap=6.0, beta=1.0)),
    ("inplace", dict(inplace_backward=True, h="logsigmoid", z_loss_scale=0.01)),
    ("ignore_index_0", dict(ignore_index=0, return_ce=True)),
]
ZLOSS_CE = dict(z_loss_scale=0.05, return_ce=True, h="logsigmoid")
REDUCTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(reduction="mean", num_items_in_batch=7),
    dict(reduction="mean", num_items_in_batch=torch.tensor(5.0)),
]
IMPLS = ("torch", "triton")
# The interpreter is slow, so the Triton path runs on a subset: with 2 ranks every option case but
# not the reductions (they happen after the Function, identically for both impls); with 3 ranks (the
# per-shard math is that of 2 ranks; 3 add the 3-way combine) only these.
TRITON_GRID_WORLD3 = ("softcap_scale_logsig", "zloss_ce", "reduction {'reduction': 'mean'}")
TRITON_FUSED = {2: ("mean_chunks", "none_zloss"), 3: ("mean_chunks",)}


def _shard(full: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return full.detach()[..., start : start + sizes[rank]].clone().requires_grad_(True)


def _upstream(loss: torch.Tensor, seed: int) -> torch.Tensor:
    """A non-trivial upstream gradient for per-token losses (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype) + 0.5


def _run_case(rank, sizes, group, full, labels, opts, seed):
    """Compare the sharded call on this rank with the single-process call and the float64
    reference. Returns nothing; raises AssertionError on mismatch. The single-process call uses
    impl="torch" (the Triton interpreter is slow; single-device Triton = torch is tested elsewhere)."""
    from gem_kernels import gem_loss
    from gem_kernels.reference import gem_loss_reference

    local = _shard(full, sizes, rank)
    out = gem_loss(local, labels, process_group=group, **opts)
    single_in = full.detach().clone().requires_grad_(True)
    single = gem_loss(single_in, labels, **dict(opts, impl="torch"))
    ref_opts = {k: v for k, v in opts.items() if k not in ("impl", "inplace_backward", "return_ce")}
    # The reference has no -inf handling (0 * inf); a huge finite negative is the same logit for it.
    ref_in = full.detach().double().nan_to_num(neginf=-1e30).requires_grad_(True)
    ref = gem_loss_reference(ref_in, labels, **ref_opts)
    loss, single_loss = (out[0], single[0]) if opts.get("return_ce") else (out, single)
    if opts.get("return_ce"):
        assert_close(out[1], single[1], what="ce vs single process", dtype=full.dtype)
    assert_close(loss, single_loss, what="loss vs single process", dtype=full.dtype)
    assert_close(loss, ref, what="loss vs float64 reference", dtype=full.dtype)
    up = _upstream(loss, seed)
    (loss * up).sum().backward()
    (single_loss * up).sum().backward()
    (ref * up.double()).sum().backward()
    start = sum(sizes[:rank])
    # With inplace_backward the gradient overwrote the caller's logits: read it from .grad anyway.
    sl = slice(start, start + sizes[rank])
    assert_close(local.grad, single_in.grad[..., sl], what="grad shard vs single process", dtype=full.dtype)
    assert_close(local.grad, ref_in.grad[..., sl], what="grad shard vs float64 reference", dtype=full.dtype)


def _run_fused_case(rank, sizes, group, seed, opts, n=9, H=6, bias=True, ignore_frac=0.25):
    """fused_linear_gem_loss with this rank's weight rows [V_local, H] (and bias slice) against the
    single-process call on the full weight and the float64 reference on hidden @ W.T + b: loss, the
    full hidden gradient (all-reduced) and this rank's weight/bias gradient rows."""
    from gem_kernels import fused_linear_gem_loss
    from gem_kernels.reference import gem_loss_reference

    V = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    _, labels = make_inputs(n, V, seed=seed, ignore_frac=ignore_frac, requires_grad=False)
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])

    def leaves(dtype, part):
        x = hid.to(dtype).requires_grad_(True)
        ww = (w[sl] if part else w).to(dtype).requires_grad_(True)
        bb = None if b is None else (b[sl] if part else b).to(dtype).requires_grad_(True)
        return x, ww, bb

    x, ww, bb = leaves(torch.float32, True)
    out = fused_linear_gem_loss(x, ww, labels, bb, process_group=group, **opts)
    xs, wws, bbs = leaves(torch.float32, False)
    single_opts = {k: v for k, v in opts.items() if k != "vocab_start"}
    single = fused_linear_gem_loss(xs, wws, labels, bbs, **dict(single_opts, impl="torch"))
    xr, wwr, bbr = leaves(torch.float64, False)
    ref_opts = {
        k: v for k, v in opts.items() if k not in ("impl", "return_ce", "chunk_size", "vocab_start", "low_memory")
    }
    ref = gem_loss_reference(torch.nn.functional.linear(xr, wwr, bbr), labels, **ref_opts)
    loss, single_loss = (out[0], single[0]) if opts.get("return_ce") else (out, single)
    if opts.get("return_ce"):
        assert_close(out[1], single[1], what="fused ce vs single process")
    assert_close(loss, single_loss, what="fused loss vs single process")
    assert_close(loss, ref, what="fused loss vs float64 reference")
    up = _upstream(loss, seed)
    (loss * up).sum().backward()
    (single_loss * up).sum().backward()
    (ref * up.double()).sum().backward()
    assert_close(x.grad, xs.grad, what="fused grad_hidden vs single process")
    assert_close(x.grad, xr.grad, what="fused grad_hidden vs float64 reference")
    assert_close(ww.grad, wws.grad[sl], what="fused grad_weight shard vs single process")
    assert_close(ww.grad, wwr.grad[sl], what="fused grad_weight shard vs float64 reference")
    if b is not None:
        assert_close(bb.grad, bbr.grad[sl], what="fused grad_bias shard vs float64 reference")


def _expect_error(fn, exc, match):
    try:
        fn()
    except exc as e:
        assert match in str(e), f"expected {match!r} in error, got: {e}"
        return
    raise AssertionError(f"expected {exc.__name__} containing {match!r}, nothing raised")


def _cases(rank, world, group):
    """Yield (name, thunk). Every rank yields the same cases in the same order."""
    from gem_kernels import gem_loss

    sizes = SHARDS[world]
    V = sum(sizes)
    seed = 0
    grid = [(name, dict(options, reduction="none")) for name, options in OPTION_CASES]
    grid += [(f"reduction {red}", dict(ZLOSS_CE, **red)) for red in REDUCTIONS if red["reduction"] != "none"]
    for name, options in grid:
        with_triton = name in TRITON_GRID_WORLD3 or (world == 2 and not name.startswith("reduction"))
        for impl in IMPLS if with_triton else ("torch",):
            seed += 1
            ignore = options.get("ignore_index", -100)
            full, labels = make_inputs(10, V, seed=seed, ignore_index=ignore, requires_grad=False)
            opts = dict(options, impl=impl)
            yield (
                f"{name}/{impl}",
                lambda full=full, labels=labels, opts=opts, seed=seed: _run_case(
                    rank, sizes, group, full, labels, opts, seed
                ),
            )

    for impl in IMPLS:
        # Rank 0's shard holds no label; logits with a leading batch shape [2, 5].
        full, labels = make_inputs(vocab=V, lead=(2, 5), seed=100, requires_grad=False)
        labels = torch.where(labels == -100, labels, labels.clamp(min=sizes[0]))
        yield (
            f"no_label_on_rank0/{impl}",
            lambda full=full, labels=labels, impl=impl: _run_case(
                rank, sizes, group, full, labels, dict(impl=impl, h="logsigmoid", return_ce=True), 3
            ),
        )
        # Every label ignored: zero loss and gradient, no NaN, for every reduction.
        full, labels = make_inputs(6, V, seed=101, ignore_frac=1.0, requires_grad=False)
        for red in REDUCTIONS:
            yield (
                f"all_ignored/{impl}/{red}",
                lambda full=full, labels=labels, impl=impl, red=red: _run_case(
                    rank, sizes, group, full, labels, dict(impl=impl, return_ce=True, **red), 4
                ),
            )
        # The last rank's shard is -inf in some rows (masked padded vocabulary) and another rank's
        # shard is -inf in one row: those shards contribute nothing, never NaN.
        full, labels = make_inputs(8, V, seed=102, ignore_frac=0.0, requires_grad=False)
        full[:4, V - sizes[-1] :] = float("-inf")
        full[5, : sizes[0]] = float("-inf")
        labels[:4] %= V - sizes[-1]  # the label logit itself stays finite
        labels[5] = V - 1
        yield (
            f"neg_inf_shard/{impl}",
            lambda full=full, labels=labels, impl=impl: _run_case(
                rank, sizes, group, full, labels, dict(impl=impl, h="logsigmoid", z_loss_scale=0.01, return_ce=True), 5
            ),
        )

        # No tokens at all: collectives on empty tensors, loss 0, empty gradient. (Not compared with
        # the single-process call, whose torch backward fails on an empty batch.)
        def empty_batch(impl=impl):
            local = torch.zeros(0, sizes[rank], requires_grad=True)
            loss, ce = gem_loss(local, torch.zeros(0, dtype=torch.long), process_group=group, impl=impl, return_ce=True)
            loss.backward()
            assert loss.item() == 0.0 and ce.item() == 0.0 and local.grad.shape == local.shape, (loss, ce)

        yield f"empty_batch/{impl}", empty_batch
        # bfloat16 logits.
        full, labels = make_inputs(8, V, seed=103, dtype=torch.bfloat16, requires_grad=False)
        yield (
            f"bf16/{impl}",
            lambda full=full, labels=labels, impl=impl: _run_case(
                rank, sizes, group, full, labels, dict(impl=impl, softcap=5.0, return_ce=True), 6
            ),
        )

    # Fused lm_head + GEM with a vocabulary-sharded weight: eager gradients (mean/sum), deferred
    # gradients (none), several chunks (chunk_size=4) and the default chunking, explicit vocab_start.
    fused_grid = [
        ("mean_chunks", dict(h="logsigmoid", softcap=4.0, return_ce=True, chunk_size=4)),
        ("none_zloss", dict(reduction="none", z_loss_scale=0.02, return_ce=True, chunk_size=4)),
        ("sum_default_chunks", dict(reduction="sum", logit_scale=1.2)),
        ("mean_num_items_explicit_start", dict(num_items_in_batch=11, vocab_start=sum(sizes[:rank]))),
        # low_memory: d weight per vocabulary slice of this rank's shard (offsets + the shard's start)
        ("low_memory_mean", dict(low_memory=True, h="logsigmoid", softcap=4.0, return_ce=True, chunk_size=4)),
        ("low_memory_none_explicit_start", dict(low_memory=True, reduction="none", vocab_start=sum(sizes[:rank]))),
    ]
    for name, options in fused_grid:
        for impl in IMPLS if name in TRITON_FUSED[world] else ("torch",):
            seed += 1
            yield (
                f"fused_{name}/{impl}",
                lambda options=options, impl=impl, seed=seed: _run_fused_case(
                    rank, sizes, group, seed, dict(options, impl=impl)
                ),
            )
    yield (
        "fused_all_ignored_no_bias",
        lambda: _run_fused_case(rank, sizes, group, 200, dict(impl="torch"), bias=False, ignore_frac=1.0),
    )

    # Explicit vocab_start equal to the derived one gives the same result (no layout all-gather).
    full, labels = make_inputs(10, V, seed=104, requires_grad=False)
    start = sum(sizes[:rank])

    def explicit():
        local = _shard(full, sizes, rank)
        a = gem_loss(local, labels, process_group=group, vocab_start=start, impl="torch", return_ce=True)
        b = gem_loss(full, labels, impl="torch", return_ce=True)
        assert_close(a[0], b[0], what="explicit vocab_start loss")
        assert_close(a[1], b[1], what="explicit vocab_start ce")

    yield "explicit_vocab_start", explicit

    def communication():
        # gem_loss: one layout all-gather, three O(tokens) all-reduces in forward, none in backward;
        # explicit vocab_start: no all-gather. Fused: three per chunk + one for grad_hidden.
        from gem_kernels import fused_linear_gem_loss

        calls = []
        real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor")}

        def spy(name):
            def f(tensor, *args, **kwargs):
                t = tensor[0] if isinstance(tensor, list) else tensor
                calls.append((name, tuple(t.shape) if name != "all_gather" else (len(tensor),)))
                return real[name](tensor, *args, **kwargs)

            return f

        for n in real:
            setattr(dist, n, spy(n))
        try:
            local = _shard(full, sizes, rank)
            loss = gem_loss(local, labels, process_group=group, impl="torch", h="logsigmoid", return_ce=True)[0]
            fwd = list(calls)
            loss.backward()
            assert calls == fwd, f"backward communicated: {calls[len(fwd) :]}"
            assert [c[0] for c in fwd] == ["all_gather", "all_reduce", "all_reduce", "all_reduce"], fwd
            assert [c[1] for c in fwd[1:]] == [(10,), (10,), (10, 4)], fwd  # t_y, max, [s0 s1 s2 sce]
            calls.clear()
            gem_loss(_shard(full, sizes, rank), labels, process_group=group, vocab_start=start, impl="torch")
            assert [c[1] for c in calls] == [(10, 2), (10,), (10, 2)], calls  # [t_y hits], max, [s0 s2]
            calls.clear()
            x = torch.randn(10, 6, requires_grad=True)
            w = torch.randn(sizes[rank], 6, requires_grad=True)
            fused_linear_gem_loss(x, w, labels, process_group=group, chunk_size=3, impl="torch").backward()
            n_chunks = -(-int((labels != -100).sum()) // 3)
            assert [c[0] for c in calls] == ["all_gather"] + ["all_reduce"] * (3 * n_chunks + 1), calls
            assert calls[-1][1] == (10, 6), calls  # grad_hidden
        finally:
            for n, f in real.items():
                setattr(dist, n, f)

    yield "communication_count", communication

    def dtensor():
        # Shard(-1) splits like torch.chunk (37 -> 19 + 18 or 13 + 13 + 11), not like SHARDS.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        from gem_kernels.integrations.dtensor import dtensor_gem_loss

        mesh = init_device_mesh("cpu", (world,))
        dt = distribute_tensor(full.detach().clone().requires_grad_(True), mesh, [Shard(-1)])
        dlabels = distribute_tensor(labels, mesh, [Replicate()])
        loss, ce = dtensor_gem_loss(dt, dlabels, h="logsigmoid", return_ce=True, impl="torch", reduction="sum")
        single_in = full.detach().clone().requires_grad_(True)
        s_loss, s_ce = gem_loss(single_in, labels, h="logsigmoid", return_ce=True, impl="torch", reduction="sum")
        assert_close(loss, s_loss, what="DTensor loss")
        assert_close(ce, s_ce, what="DTensor ce")
        loss.backward()
        s_loss.backward()
        step = -(-V // world)
        assert dt.grad is not None and tuple(dt.grad.placements) == (Shard(1),), dt.grad
        assert_close(dt.grad.to_local(), single_in.grad[:, rank * step : (rank + 1) * step], what="DTensor grad shard")
        _expect_error(
            lambda: dtensor_gem_loss(distribute_tensor(full, mesh, [Replicate()]), labels), ValueError, "Shard(-1)"
        )

    if world == 2:  # importing torch.distributed.tensor costs seconds per process: once is enough
        yield "dtensor_shard_last_dim", dtensor

    # Errors that every rank detects together (nobody is left waiting in a collective).
    def tokens_mismatch():
        x = full[: 10 - rank] if rank == world - 1 else full
        y = labels[: 10 - rank] if rank == world - 1 else labels
        _expect_error(
            lambda: gem_loss(_shard(x, sizes, rank), y, process_group=group, impl="torch"), ValueError, "same tokens"
        )

    yield "error_token_count_mismatch", tokens_mismatch

    def labels_differ():
        y = labels.clone()
        if rank == 1:
            y[0] = (int(y[0]) + 1) % V if int(y[0]) >= 0 else 3
        _expect_error(
            lambda: gem_loss(_shard(full, sizes, rank), y, process_group=group, impl="torch"),
            ValueError,
            "labels differ between ranks",
        )

    yield "error_labels_differ", labels_differ

    def label_out_of_range():
        y = labels.clone()
        y[1] = V  # valid for no shard: the global V is the sum of shard sizes
        _expect_error(
            lambda: gem_loss(_shard(full, sizes, rank), y, process_group=group, impl="torch"), ValueError, f"[0, {V})"
        )

    yield "error_label_out_of_global_range", label_out_of_range

    def bad_labels_shape_on_one_rank():
        y = labels[:-1] if rank == 0 else labels
        match = "labels must have shape" if rank == 0 else "rank(s) [0]"
        _expect_error(
            lambda: gem_loss(_shard(full, sizes, rank), y, process_group=group, impl="torch"), ValueError, match
        )

    yield "error_labels_shape_one_rank", bad_labels_shape_on_one_rank

    def empty_shard():
        local = full[:, :0] if rank == 0 else _shard(full, sizes, rank)
        _expect_error(
            lambda: gem_loss(local, labels, process_group=group, impl="torch"), ValueError, "at least 1 column"
        )

    yield "error_empty_shard", empty_shard

    def explicit_gap():
        # Rank 0 claims to start at 1: label 0 lies in no shard, id sizes[0] in two.
        y = labels.clone()
        y[2] = 0
        _expect_error(
            lambda: gem_loss(
                _shard(full, sizes, rank),
                y,
                process_group=group,
                vocab_start=start + 1 if rank == 0 else start,
                impl="triton",
            ),
            ValueError,
            "vocabulary shards of the process group",
        )

    yield "error_explicit_vocab_start_gap", explicit_gap

    def explicit_out_of_range():
        y = labels.clone()
        y[3] = V + 5
        _expect_error(
            lambda: gem_loss(_shard(full, sizes, rank), y, process_group=group, vocab_start=start, impl="torch"),
            ValueError,
            "expected exactly 1",
        )

    yield "error_explicit_vocab_start_label_range", explicit_out_of_range

    def reference_impl():
        _expect_error(
            lambda: gem_loss(_shard(full, sizes, rank), labels, process_group=group, impl="reference"),
            ValueError,
            "impl='reference'",
        )

    yield "error_reference_impl", reference_impl


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world, tmp_path):
    """Losses (every reduction, num_items_in_batch, return_ce) and gradient shards equal
    single-process gem_loss on the concatenated logits, for both impls and every option; plus
    uneven shards, a rank without labels, all-ignored batches, -inf shards, bf16, explicit
    vocab_start, and clear errors raised on every rank for inconsistent inputs."""
    run_on_ranks(_cases, world, tmp_path, min_cases=31)


def test_vocab_start_without_group_is_an_error():
    from gem_kernels import gem_loss

    logits, labels = make_inputs(4, 11)
    with pytest.raises(ValueError, match="vocab_start is only meaningful with process_group"):
        gem_loss(logits, labels, vocab_start=3, impl="torch")
