"""return_metrics under vocabulary parallelism (gloo, CPU, 127.0.0.1 only), as in test_vocab_parallel.py:
each rank's statistics must equal single-process gem_loss on the concatenated logits and the float64
reference, including arg-max ties that straddle shards, -inf shards and ignored tokens."""

from __future__ import annotations

import os

# conftest.py already chose: "1" on the CPU test device (inherited by the children), "0" on CUDA, where
# this module is skipped; setdefault keeps a CUDA run's compiled kernels and impl="auto" choice intact.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import assert_close, make_inputs, only_on, run_on_ranks  # noqa: E402

pytestmark = only_on(
    "cpu", "gloo process groups of CPU processes, whose impl='triton' cases need the Triton interpreter"
)

SHARDS = {2: [13, 24], 3: [5, 20, 12]}
NAMES = ("ce", "entropy", "token_accuracy")
REDUCTIONS = [
    dict(reduction="none"),
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="mean", num_items_in_batch=7),
]
OPTIONS = [dict(), dict(h="logsigmoid", softcap=4.0, logit_scale=1.3, z_loss_scale=0.05, return_ce=True)]


def _inputs(sizes, seed):
    """Logits [10, V] with ignored tokens, a shard of -inf in row 1, and equal maxima straddling
    shard boundaries (rows 2-5: the label at the lower or the higher of two equal maxima)."""
    V = sum(sizes)
    full, labels = make_inputs(10, V, seed=seed, ignore_frac=0.2, requires_grad=False, device="cpu")
    full = full.clone()
    full[1, : sizes[0]] = float("-inf")
    labels[1] = sizes[0]  # a finite column
    b0, last = sizes[0], V - 1
    for row, (a, b, lab) in enumerate([(b0 - 1, b0, b0 - 1), (b0 - 1, b0, b0), (0, last, 0), (0, last, last)], 2):
        full[row, a] = full[row, b] = 20.0
        labels[row] = lab
    return full, labels


def _check(rank, sizes, group, opts, seed):
    from gem_kernels import gem_loss
    from gem_kernels.reference import gem_loss_reference

    full, labels = _inputs(sizes, seed)
    start = sum(sizes[:rank])
    local = full[:, start : start + sizes[rank]].clone()
    ref_opts = {k: v for k, v in opts.items() if k not in ("impl", "return_ce", "vocab_start")}
    truth = gem_loss_reference(full.double(), labels, return_metrics=True, **ref_opts)[1]
    single_opts = {k: v for k, v in opts.items() if k != "vocab_start"}
    single = gem_loss(full, labels, return_metrics=True, **dict(single_opts, impl="torch"))[-1]
    out = gem_loss(local, labels, process_group=group, return_metrics=True, **opts)
    for name in NAMES:
        what = f"{name} {opts}"
        assert_close(out[-1][name], single[name], what=f"{what} vs single process")
        assert_close(out[-1][name], truth[name], what=f"{what} vs float64 reference")
    if opts.get("reduction") == "none":
        want = torch.tensor([1.0, 0.0, 1.0, 0.0])
        assert torch.equal(out[-1]["token_accuracy"][2:6], want), out[-1]["token_accuracy"]


def _check_fused(rank, sizes, group, impl, seed):
    from gem_kernels import fused_linear_gem_loss
    from gem_kernels.reference import gem_loss_reference

    V, H = sum(sizes), 6
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64)
    _, labels = make_inputs(9, V, seed=seed, ignore_frac=0.25, requires_grad=False, device="cpu")
    labels[0] = int((x[0] @ w.T).argmax())  # at least one token where the label is the arg-max
    start = sum(sizes[:rank])
    xs, ws = x.float().requires_grad_(True), w[start : start + sizes[rank]].float().requires_grad_(True)
    loss, m = fused_linear_gem_loss(
        xs, ws, labels, process_group=group, impl=impl, reduction="none", return_metrics=True, chunk_size=4
    )
    loss.sum().backward()
    truth = gem_loss_reference(x @ w.T, labels, reduction="none", return_metrics=True)[1]
    for name in NAMES:
        assert_close(m[name], truth[name], what=f"fused {impl} {name} vs float64 reference")


def _cases(rank, world, group):
    sizes = SHARDS[world]
    for impl in ("torch", "triton"):
        for i, red in enumerate(REDUCTIONS):
            for j, opt in enumerate(OPTIONS):
                if impl == "triton" and (world == 3 and (i, j) != (0, 1)):
                    continue  # the interpreter is slow; the 3-way combine is the same code as 2-way
                opts = dict(opt, **red, impl=impl)
                yield f"{impl} {red} {opt}", lambda opts=opts: _check(rank, sizes, group, opts, seed=11)
        yield f"fused {impl}", lambda impl=impl: _check_fused(rank, sizes, group, impl, seed=12)
    # explicit vocab_start: the label check rides on the t_y all-reduce; the statistics are the same
    yield (
        "explicit vocab_start",
        lambda: _check(
            rank, sizes, group, dict(reduction="none", impl="torch", vocab_start=sum(sizes[:rank])), seed=13
        ),
    )


@pytest.mark.parametrize("world", [2, 3])
def test_metrics_vocab_parallel(world, tmp_path):
    run_on_ranks(_cases, world, tmp_path, min_cases=12)
