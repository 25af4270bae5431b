"""Global-memory traffic of Triton kernels, counted under the Triton interpreter.

``count_traffic(fn, *args, **kwargs)`` runs ``fn`` and adds up the bytes that every Triton
``load`` / ``store`` (and atomic) issued while it ran touches in global memory, counting only
lanes whose mask is true. It works by wrapping the interpreter's builder methods, so the kernels
must run under the interpreter (``TRITON_INTERPRET=1`` set before triton and the kernel modules
are imported); PyTorch operations outside Triton kernels are not counted.

What the number means: bytes *requested* by the kernel's memory instructions. For a streaming
kernel that touches each byte once this is its DRAM traffic; a kernel that re-reads data which
would sit in a GPU cache is charged again for each re-read (so the count is an upper bound on
DRAM traffic, and an exact count of what the kernel asks of the memory system).

``reread_bytes`` (part of ``loaded_bytes``) counts loads of addresses the same program (one grid
point of one launch) has already loaded: a kernel that reads a row and then reads it again (the
GEM gradient-in-forward kernel) has its second read counted there. On a GPU such a re-read is
served from L2 when the program's working set is still resident, so ``loaded_bytes - reread_bytes``
is the DRAM read traffic when it is; whether it is can only be measured on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any, List

import numpy as np

_LOCK = threading.Lock()
_ACTIVE: List["TrafficReport"] = []  # reports currently counting (nested calls all count)
_INSTALLED = False


@dataclasses.dataclass(eq=False)  # identity equality: nested reports are removed by identity
class TrafficReport:
    """Bytes loaded / stored by Triton kernels during one call; ``result`` is the call's return value."""

    loaded_bytes: int = 0
    stored_bytes: int = 0
    reread_bytes: int = 0  # loaded bytes at addresses the same program had loaded before (see above)
    loads: int = 0  # memory instructions executed (one per program per tl.load), for diagnostics
    stores: int = 0
    result: Any = None

    @property
    def total_bytes(self) -> int:
        return self.loaded_bytes + self.stored_bytes

    def passes(self, numel: int, element_size: int) -> float:
        """Traffic as passes over a tensor of ``numel`` elements of ``element_size`` bytes (e.g. the logits)."""
        return self.total_bytes / float(numel * element_size)


def _element_bytes(ptr_handle) -> int:
    return max(1, ptr_handle.get_element_ty().primitive_bitwidth // 8)


def _active_lanes(ptr_handle, mask_handle) -> int:
    if mask_handle is None:
        return int(np.asarray(ptr_handle.data).size)
    mask = np.asarray(mask_handle.data)
    return int(np.count_nonzero(np.broadcast_to(mask, np.asarray(ptr_handle.data).shape)))


def _add(loaded: int = 0, stored: int = 0, reread: int = 0) -> None:
    if not _ACTIVE:
        return
    with _LOCK:
        for rep in _ACTIVE:
            rep.loaded_bytes += loaded
            rep.stored_bytes += stored
            rep.reread_bytes += reread
            rep.loads += loaded > 0
            rep.stores += stored > 0


class _ProgramReads:
    """Byte intervals [lo, hi) the current program has loaded, merged and sorted; reset whenever
    the interpreter moves to another grid point (or launch)."""

    def __init__(self):
        self.lo = np.empty(0, dtype=np.int64)
        self.hi = np.empty(0, dtype=np.int64)

    def reset(self) -> None:
        self.lo = np.empty(0, dtype=np.int64)
        self.hi = np.empty(0, dtype=np.int64)

    def add(self, addrs: np.ndarray, nbytes: int) -> int:
        """Record a load of the byte ranges [a, a + nbytes) for a in addrs; returns how many of
        those bytes had been loaded before by this program."""
        if addrs.size == 0:
            return 0
        a = np.unique(addrs.astype(np.int64))
        # Runs of contiguous elements become one interval each.
        breaks = np.nonzero(np.diff(a) != nbytes)[0]
        starts = np.concatenate(([a[0]], a[breaks + 1]))
        ends = np.concatenate((a[breaks], [a[-1]])) + nbytes
        seen = 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            # overlap of [s, e) with the recorded disjoint intervals
            i = np.searchsorted(self.hi, s, side="right")
            j = np.searchsorted(self.lo, e, side="left")
            if j > i:
                seen += int(np.sum(np.minimum(self.hi[i:j], e) - np.maximum(self.lo[i:j], s)))
        lo = np.concatenate((self.lo, starts))
        hi = np.concatenate((self.hi, ends))
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        # merge overlapping or touching intervals
        run_hi = np.maximum.accumulate(hi)
        new_run = np.concatenate(([True], lo[1:] > run_hi[:-1]))
        idx = np.nonzero(new_run)[0]
        self.lo = lo[idx]
        self.hi = np.maximum.reduceat(hi, idx) if idx.size else hi
        return seen


_READS = _ProgramReads()


def _install() -> None:
    """Wrap the interpreter builder's memory methods once (idempotent, thread-safe)."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        from triton.runtime import interpreter as interp

        cls = interp.InterpreterBuilder
        # Plain and descriptor loads/stores and atomic load/store all funnel into the masked
        # versions, so wrapping those two counts each access exactly once.
        orig_load = cls.create_masked_load
        orig_store = cls.create_masked_store
        orig_rmw = cls.create_atomic_rmw
        orig_cas = cls.create_atomic_cas

        orig_set_grid_idx = cls.set_grid_idx

        @functools.wraps(orig_set_grid_idx)
        def set_grid_idx(self, x, y, z):
            _READS.reset()  # a new program (of this or of another launch) starts
            return orig_set_grid_idx(self, x, y, z)

        @functools.wraps(orig_load)
        def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            if _ACTIVE:
                nbytes = _element_bytes(ptrs)
                addrs = np.asarray(ptrs.data)
                if mask is not None:
                    addrs = addrs[np.broadcast_to(np.asarray(mask.data), addrs.shape)]
                addrs = addrs.reshape(-1)
                _add(loaded=addrs.size * nbytes, reread=_READS.add(addrs, nbytes))
            return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

        @functools.wraps(orig_store)
        def create_masked_store(self, ptrs, value, mask, cache_policy):
            _add(stored=_active_lanes(ptrs, mask) * _element_bytes(ptrs))
            return orig_store(self, ptrs, value, mask, cache_policy)

        @functools.wraps(orig_rmw)
        def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
            nbytes = _active_lanes(ptr, mask) * _element_bytes(ptr)
            _add(loaded=nbytes, stored=nbytes)  # read-modify-write touches each lane twice
            return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

        @functools.wraps(orig_cas)
        def create_atomic_cas(self, ptr, cmp, val, sem, scope):
            nbytes = _active_lanes(ptr, None) * _element_bytes(ptr)
            _add(loaded=nbytes, stored=nbytes)
            return orig_cas(self, ptr, cmp, val, sem, scope)

        cls.set_grid_idx = set_grid_idx
        cls.create_masked_load = create_masked_load
        cls.create_masked_store = create_masked_store
        cls.create_atomic_rmw = create_atomic_rmw
        cls.create_atomic_cas = create_atomic_cas
        _INSTALLED = True


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def count_traffic(fn, *args, **kwargs) -> TrafficReport:
    """Run ``fn(*args, **kwargs)`` and count the global-memory bytes its Triton kernels load and store.

    Raises RuntimeError when the Triton interpreter is not on, since compiled kernels cannot be
    instrumented and the count would silently be 0.
    """
    if not interpreter_active():
        raise RuntimeError(
            "count_traffic needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "importing triton or any kernel module"
        )
    _install()
    report = TrafficReport()
    with _LOCK:
        _ACTIVE.append(report)
    try:
        report.result = fn(*args, **kwargs)
    finally:
        with _LOCK:
            _ACTIVE.remove(report)
    return report
