"""The one input factory and the one comparison helper every test uses, and the test device.

The suite runs on one device, chosen once per run by :func:`select_device`: CUDA when a GPU is
available (Triton kernels compiled for it), else the CPU with the Triton interpreter
(``tests/conftest.py`` switches it on only then). ``GEM_TEST_DEVICE=cpu`` or ``cuda`` forces the
choice; ``cuda`` without a usable GPU is an error, not a silent fallback. ``make_inputs`` creates
its tensors on that device, and the tolerances below are the same on both.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch

DEVICE_VARIABLE = "GEM_TEST_DEVICE"


def select_device(value: Optional[str] = None, cuda_available: Optional[bool] = None) -> str:
    """The test device: "cuda" or "cpu".

    value: the setting ("", "auto", "cpu" or "cuda"; default: the GEM_TEST_DEVICE environment
        variable, unset = "auto"). "auto" is "cuda" when ``cuda_available`` (default:
        ``torch.cuda.is_available()``), else "cpu".
    Raises ValueError for any other value, and RuntimeError for "cuda" without a usable GPU.
    """
    if value is None:
        value = os.environ.get(DEVICE_VARIABLE, "")
    value = value.strip().lower()
    if value not in ("", "auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_VARIABLE} must be 'cpu', 'cuda' or 'auto' (or unset), got {value!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if value == "cuda" and not cuda_available:
        raise RuntimeError(
            f"{DEVICE_VARIABLE}=cuda, but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); unset it or use "
            f"{DEVICE_VARIABLE}=cpu to run on the CPU with the Triton interpreter"
        )
    if value in ("", "auto"):
        return "cuda" if cuda_available else "cpu"
    return value


# conftest.py validated the setting before any test module is imported, so this does not raise here.
DEVICE = select_device()
ON_CUDA = DEVICE == "cuda"

# Absolute/relative tolerances per dtype for comparing against a float64 truth, used when no
# same-dtype PyTorch baseline is available.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def make_inputs(
    n: int = 24,
    vocab: int = 1001,
    *,
    dtype: torch.dtype = torch.float32,
    lead: Optional[Sequence[int]] = None,
    ignore_frac: float = 0.25,
    ignore_index: int = -100,
    scale: float = 3.0,
    seed: int = 0,
    requires_grad: bool = True,
    device: Optional[str] = None,
):
    """logits [*lead, vocab] (normal * scale, in ``dtype``) and labels [*lead] with about
    ``ignore_frac`` of them set to ``ignore_index``, on ``device`` (default: the test device,
    :data:`DEVICE`). ``lead`` defaults to (n,). The numbers are drawn on the CPU, so a seed gives
    the same inputs on every device."""
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead) if lead is not None else (n,)
    logits = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, lead, generator=g)
    if ignore_frac > 0:
        drop = torch.rand(lead, generator=g) < ignore_frac
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    device = device or DEVICE
    logits, labels = logits.to(device), labels.to(device)
    logits.requires_grad_(requires_grad)
    return logits, labels


def fresh(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A detached copy (optionally cast) that requires grad like ``x``."""
    y = x.detach().clone()
    if dtype is not None:
        y = y.to(dtype)
    return y.requires_grad_(x.requires_grad)


def _describe(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    if a.numel() == 0:
        return "empty"
    diff = (a - e).abs()
    i = int(diff.argmax())
    rel = diff / e.abs().clamp(min=1e-12)
    return (
        f"max abs err {diff[i].item():.3e} at flat index {i} (actual {a[i].item():.6g}, "
        f"expected {e[i].item():.6g}); max rel err {rel.max().item():.3e}; "
        f"nan actual/expected {int(a.isnan().sum())}/{int(e.isnan().sum())}"
    )


def assert_close(
    actual,
    expected,
    *,
    what: str,
    dtype: Optional[torch.dtype] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    baseline: Optional[torch.Tensor] = None,
    margin: float = 2.0,
):
    """Assert ``actual`` matches ``expected`` (usually the float64 truth) with a verbose message.

    With ``baseline`` (the same computation done by plain PyTorch in the same dtype), the error of
    ``actual`` must not exceed ``margin`` times the baseline's own error plus the dtype's atol:
    the kernel may be as inexact as PyTorch itself is in that dtype, and not much more.
    Otherwise the per-dtype ``TOLERANCES`` (or explicit atol/rtol) apply.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dt = dtype or (actual.dtype if actual.dtype in TOLERANCES else torch.float32)
    d_atol, d_rtol = TOLERANCES[dt]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double()
    e = expected.detach().double()
    assert not a.isnan().any(), f"{what}: NaN in result; {_describe(actual, expected)}"
    if baseline is not None:
        err = (a - e).abs().max().item() if a.numel() else 0.0
        base = (baseline.detach().double() - e).abs().max().item() if a.numel() else 0.0
        bound = margin * base + atol
        assert err <= bound, (
            f"{what} [{dt}]: error {err:.3e} exceeds {margin} x same-dtype PyTorch "
            f"error {base:.3e} + atol {atol:.1e}; {_describe(actual, expected)}"
        )
        return
    ok = (a - e).abs() <= atol + rtol * e.abs()
    assert bool(ok.all()), f"{what} [{dt}] (atol {atol:.1e}, rtol {rtol:.1e}): {_describe(actual, expected)}"


def run_gem(logits: torch.Tensor, labels: torch.Tensor, impl: str, *, upstream=None, inplace: bool = False, **options):
    """One call of ``gem_loss`` (``impl="reference"``: ``gem_loss_reference``) on a fresh copy of
    ``logits`` and its backward: returns (the outputs as a tuple, the gradient of the copy).

    upstream: the factor the loss (the first output) is multiplied by before backward, a float or a
        tensor of the loss's shape (moved to its device); a per-token loss is then summed. Default:
        1 for a reduced loss, weights linspace(-1, 2) for a per-token one (so that each token's
        upstream gradient differs).
    inplace: call with ``inplace_backward=True`` on a non-leaf copy (whose storage may be
        overwritten); the gradient is still read from the leaf.
    """
    from gem_kernels import gem_loss
    from gem_kernels.reference import gem_loss_reference

    leaf = fresh(logits)
    x = leaf
    if inplace:
        x = leaf * 1
        x.retain_grad()
    if impl == "reference":
        out = gem_loss_reference(x, labels, **options)
    else:
        out = gem_loss(x, labels, impl=impl, **({"inplace_backward": True} if inplace else {}), **options)
    outs = out if isinstance(out, tuple) else (out,)
    loss = outs[0]
    if upstream is None:
        upstream = (
            torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
            if loss.dim()
            else 1.0
        )
    elif isinstance(upstream, torch.Tensor):
        upstream = upstream.to(loss.device)
    (loss * upstream).sum().backward()
    return outs, leaf.grad


def check_gem_against_reference(
    logits: torch.Tensor, labels: torch.Tensor, impl: str, *, upstream=None, inplace: bool = False, **options
):
    """``gem_loss(logits, labels, impl=impl, **options)`` and its gradient (see
    :func:`run_gem` for ``upstream`` and ``inplace``) against the float64 truth, each
    error held to the same-dtype PyTorch (the reference in the logits' dtype) error plus a margin;
    outputs are float32 and the gradient is in the logits' dtype."""
    dtype = logits.dtype
    outs, grad = run_gem(logits, labels, impl, upstream=upstream, inplace=inplace, **options)
    truth_outs, truth_grad = run_gem(fresh(logits, torch.float64), labels, "reference", upstream=upstream, **options)
    base_outs, base_grad = run_gem(logits, labels, "reference", upstream=upstream, **options)
    what = f"({impl}, {dtype}, {options}, upstream {upstream}, inplace {inplace})"
    for i, (a, t, b) in enumerate(zip(outs, truth_outs, base_outs)):
        assert a.dtype == torch.float32, f"output {i} dtype {a.dtype} {what}"
        assert_close(a, t, what=f"output {i} {what}", dtype=dtype, baseline=b)
    assert grad.dtype == dtype, f"grad dtype {grad.dtype} {what}"
    assert_close(grad, truth_grad, what=f"grad {what}", dtype=dtype, baseline=base_grad)


@contextlib.contextmanager
def no_host_reads():
    """Make every tensor-to-host conversion raise (item, float, int, bool, index, tolist, nonzero)."""
    names = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"host read: Tensor.{name}")

        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def only_on(device: str, reason: str):
    """Mark a test that only makes sense on ``device`` ("cpu" or "cuda"): skipped elsewhere, with
    ``reason`` (say why, e.g. "counts bytes under the Triton interpreter")."""
    import pytest

    return pytest.mark.skipif(DEVICE != device, reason=f"{device} only: {reason}")


def run_on_ranks(cases, world: int, out_dir, *, min_cases: int) -> None:
    """Run the cases of a multi-process test in ``world`` spawned CPU processes joined by a gloo
    process group on 127.0.0.1, and assert that they all passed.

    cases: a module-level function ``cases(rank, world, group)`` yielding ``(name, thunk)``; every
        rank yields the same names in the same order, so that the collectives line up. A thunk
        raises (usually AssertionError) on failure; the other cases still run.
    out_dir: a directory (e.g. pytest's tmp_path) where each rank writes its report.
    min_cases: the fewest cases a rank must have run (guards against a generator that stops early).
    Spawning costs seconds, so a test launches once and runs many cases per launch.
    """
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(world, _free_port(), str(out_dir), cases), nprocs=world, join=True)
    reports = [open(os.path.join(out_dir, f"rank{r}.txt")).read() for r in range(world)]
    counts = {rep.splitlines()[0] for rep in reports}
    assert len(counts) == 1 and int(counts.pop().split()[0]) >= min_cases, reports
    failures = [line for rep in reports for line in rep.splitlines()[1:] if line.strip()]
    assert not failures, "\n".join(failures)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out_dir: str, cases) -> None:
    """One process of :func:`run_on_ranks`: its first report line is the number of cases run, the
    rest its failures (an assertion's message, or the traceback of any other error)."""
    import datetime
    import traceback

    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    failures, names = [], []
    try:
        group = dist.new_group(list(range(world)))  # a non-default group, as tensor parallelism uses
        for name, thunk in cases(rank, world, group):
            names.append(name)
            try:
                thunk()
            except AssertionError as e:
                failures.append(f"[rank {rank}] {name}: {e}")
            except Exception:
                failures.append(f"[rank {rank}] {name}: {traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{len(names)} cases\n" + "\n".join(failures))
        dist.destroy_process_group()
