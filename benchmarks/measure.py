"""Measuring memory and matmul FLOPs of one call, on CPU or CUDA.

Used by the fused-linear tests and the benchmark scripts; the API (``peak_memory``, ``count_flops``,
``MemoryReport``) is stable.

- ``peak_memory(fn, *args, **kwargs)`` runs ``fn`` once and reports the peak number of bytes held by
  tensor allocations made during the call, above what was allocated before it (the baseline is 0 by
  construction: only allocations and frees that happen inside the call are counted, so a free of a
  tensor that existed before the call can lower the curve below 0 but never raises the peak), and
  the largest single allocation. On CPU the allocations come from ``torch.profiler`` with
  ``profile_memory=True`` (every allocator call is an event with a signed byte count, replayed in
  time order). On CUDA the peak is ``torch.cuda.max_memory_allocated()`` after a reset, minus
  ``torch.cuda.memory_allocated()`` before the call, and the largest allocation again comes from the
  profiler's CUDA memory events.
- ``count_flops(fn, *args, **kwargs)`` counts matmul FLOPs with ``torch.utils.flop_counter.FlopCounterMode``
  (2 per multiply-add), adding the in-place ``addmm_`` / ``baddbmm_`` that it does not count by itself.
  Out-of-place and ``out=`` variants (``mm``, ``addmm``, ``bmm``, ``baddbmm``) are already counted.
  Work done inside Triton kernels is invisible to it by design.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, List

import torch
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, mm_flop

__all__ = ["MemoryReport", "peak_memory", "count_flops"]

_MEMORY_EVENT = "[memory]"


@dataclass
class MemoryReport:
    """Memory used by one call.

    peak_bytes: max over the call of (bytes allocated during the call and not yet freed).
    largest_alloc_bytes: the largest single allocation made during the call.
    result: what ``fn`` returned.
    device: "cpu" or "cuda".
    num_allocs: number of allocations seen (profiler events; 0 when unknown).
    end_bytes: bytes still held at the end of the call (e.g. returned tensors, saved activations).
    """

    peak_bytes: int
    largest_alloc_bytes: int
    result: Any = field(repr=False, default=None)
    device: str = "cpu"
    num_allocs: int = 0
    end_bytes: int = 0
    alloc_sizes: List[int] = field(repr=False, default_factory=list)  # every allocation, in order

    def count_allocs_at_least(self, nbytes: int) -> int:
        """How many single allocations were at least ``nbytes`` (e.g. one [N, V] tensor)."""
        return sum(1 for n in self.alloc_sizes if n >= nbytes)

    def mib(self) -> str:
        return (
            f"peak {self.peak_bytes / 2**20:.2f} MiB, largest allocation "
            f"{self.largest_alloc_bytes / 2**20:.2f} MiB ({self.num_allocs} allocations)"
        )


def _replay(sizes: List[int]):
    """(peak, largest, count, end) of a signed allocation trace (positive = alloc, negative = free)."""
    cur = peak = largest = count = 0
    for n in sizes:
        cur += n
        if n > 0:
            count += 1
            largest = max(largest, n)
        peak = max(peak, cur)
    return peak, largest, count, cur


@contextlib.contextmanager
def quiet_fd2():
    """Silence file descriptor 2 (C++ writes to stderr) for the duration; Python exceptions still
    propagate. Used around the profiler's start and stop, whose kineto build prints
    ``USDT ... profiler_start`` / ``profiler_stop`` lines that would land inside a caller's output."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture etc.: nothing to silence
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _profile(fn: Callable, args, kwargs, device_type):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device_type == torch.device("cuda").type:
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, profile_memory=True, record_shapes=False)
    with quiet_fd2():  # only start and stop are silenced: what fn prints (warnings, errors) stays visible
        prof.__enter__()
    try:
        result = fn(*args, **kwargs)
        if device_type == "cuda":
            torch.cuda.synchronize()
    finally:
        with quiet_fd2():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == _MEMORY_EVENT]
    events.sort(key=lambda e: e.start_ns())
    want = torch.device(device_type).type
    sizes = [e.nbytes() for e in events if str(e.device_type()).split(".")[-1].lower() == want]
    return result, sizes


def peak_memory(fn: Callable, *args, device: str = "cpu", **kwargs) -> MemoryReport:
    """Run ``fn(*args, **kwargs)`` once and measure its allocations on ``device`` ("cpu" or "cuda").

    Put everything to be measured inside ``fn`` (e.g. forward and ``backward()``); inputs created
    before the call are the baseline and are not counted.
    """
    dev = torch.device(device).type
    gc.collect()  # garbage of earlier calls must not be freed inside the measured window
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result, sizes = _profile(fn, args, kwargs, "cuda")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        end = torch.cuda.memory_allocated() - base
        _, largest, count, _ = _replay(sizes)
        return MemoryReport(max(peak, 0), largest, result, "cuda", count, end, [n for n in sizes if n > 0])
    if dev != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    result, sizes = _profile(fn, args, kwargs, "cpu")
    peak, largest, count, end = _replay(sizes)
    return MemoryReport(peak, largest, result, "cpu", count, end, [n for n in sizes if n > 0])


def _inplace_addmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return mm_flop(a_shape, b_shape)


def _inplace_baddbmm_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return bmm_flop(a_shape, b_shape)


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Matmul FLOPs (2 per multiply-add) of every matmul ``fn(*args, **kwargs)`` runs through ATen,
    including in-place ``addmm_`` and ``baddbmm_``."""
    aten = torch.ops.aten
    mapping = {aten.addmm_: _inplace_addmm_flop, aten.baddbmm_: _inplace_baddbmm_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
