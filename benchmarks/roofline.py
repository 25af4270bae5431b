"""Logical bytes of the Triton providers, and the rooflines a run measures for itself.

**Logical bytes** (``bytes_model``): global-memory bytes that a provider's Triton kernels load and
store, per phase, as a function of the shape: T tokens of which Tv have a label (the others are -100),
vocabulary V, element size e of the logits (or of the fused path's logits chunks). Only the terms
proportional to V are modelled; labels and per-row statistics add under ``PER_TOKEN_BOUND`` bytes
per token (< 0.1 % at V >= 32k). Where each figure comes from:

- ``gem-triton`` (gem_loss impl="triton", also with inplace_backward; both h): this package's
  gradient-in-forward design (docs/kernels.md), which a mean loss whose logits need a gradient runs:
  the forward reads each valid row twice (the second time right after the first, from L2 on a GPU)
  and writes the gradient of every row (zeros for ignored ones, which are not read); the backward
  only compares each row's upstream gradient with the token weight (per-token terms):
  fwd = (2 Tv + T) V e, bwd = 0.
- ``gem-fused`` (fused_linear_gem_loss impl="triton"): the same kernel on [chunk, V] logits buffers
  of valid rows only; with a reduced loss the gradient is made in the forward (two reads of the
  chunk and dZ written over it): fwd = 3 Tv V e, bwd = 0 (backward only rescales, in PyTorch).
- ``liger-ce`` (Liger-Kernel cross_entropy, and its fused linear CE on chunks of all tokens): its
  kernel reads a valid row twice (online softmax, then the gradient) and writes the gradient over
  the logits in the forward; an ignored row gets a zero row written: fwd = (3 Tv + (T - Tv)) V e,
  bwd = 0 (with a mean loss the upstream gradient is 1 and Liger skips its rescaling kernel).
- ``trl-fused`` (TRL's ChunkedLogProbFunction, read from trl/kernels/chunked_logprob.py, not counted
  here: on a CPU TRL runs torch ops instead): its fold kernel reads each [tokens, chunk] tile of
  valid rows once; the backward kernel reads the recomputed tile and writes the gradient over it:
  fwd = Tv V e, bwd = 2 Tv V e (cuBLAS traffic of the tiles' matmuls not included).

The gem-triton, gem-fused and liger-ce figures equal what ``benchmarks.traffic`` counts under the
Triton interpreter up to the per-token terms (tests/test_benchmarks_smoke.py checks this), so a
kernel change that moves them fails that test. Matmul (cuBLAS) traffic is in none of them.

**Rooflines measured in the same run** (``calibrate``): the device's copy bandwidth (bytes read +
written by ``dst.copy_(src)`` on a large buffer, per second) and, per shape, the matmul rate of that
shape's lm_head product ``hidden @ weight.T`` in the run's dtype. The loss table reports bytes /
time against the copy bandwidth; the step table reports the matmul floor, 6 x Tv x H x V FLOPs (the
lm_head's forward and both backward products over valid tokens) at that rate, against the time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

PER_TOKEN_BOUND = 128  # bytes per token of labels and per-row statistics, above the modelled V terms


def _gem_triton(T, Tv, V, e):
    return (2 * Tv + T) * V * e, 0


def _gem_fused(T, Tv, V, e):
    return 3 * Tv * V * e, 0


def _liger_ce(T, Tv, V, e):
    return (3 * Tv + (T - Tv)) * V * e, 0


def _trl_fused(T, Tv, V, e):
    return Tv * V * e, 2 * Tv * V * e


BYTES_MODELS: Dict[str, Callable] = {
    "gem-triton": _gem_triton,
    "gem-fused": _gem_fused,
    "liger-ce": _liger_ce,
    "trl-fused": _trl_fused,
}
BYTES_SOURCES = {
    "gem-triton": "design (counted under the interpreter)",
    "gem-fused": "design (counted under the interpreter)",
    "liger-ce": "Liger's kernel (counted under the interpreter)",
    "trl-fused": "TRL's code (not counted: TRL runs torch ops on a CPU)",
}


def model_bytes(key: Optional[str], tokens: int, valid: int, vocab: int, element_size: int) -> Dict[str, int]:
    """{phase: bytes} of a bytes model (empty when ``key`` is None)."""
    if key is None:
        return {}
    fwd, bwd = BYTES_MODELS[key](tokens, valid, vocab, element_size)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}


@dataclass
class Calibration:
    device: str
    copy_bytes_per_s: float  # bytes read + written per second by a device copy
    copy_buffer_bytes: int
    matmul_flops_per_s: Dict[str, float] = field(default_factory=dict)  # per shape label

    def describe(self) -> str:
        return (
            f"copy bandwidth {self.copy_bytes_per_s / 1e9:.1f} GB/s (read + write of a "
            f"{self.copy_buffer_bytes / 2**20:.0f} MiB buffer, {self.device})"
        )


def _time_ms(fn: Callable, device: str) -> float:
    """Median milliseconds of ``fn()``: triton.testing.do_bench on a GPU, best of 5 on a CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def copy_bandwidth(device: str) -> Calibration:
    """Bytes (read + written) per second of ``dst.copy_(src)`` on 1 GiB (GPU) / 64 MiB (CPU)."""
    nbytes = 2**30 if device == "cuda" else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = _time_ms(functools.partial(dst.copy_, src), device)
    del src, dst
    return Calibration(device, 2 * nbytes / (ms / 1e3), nbytes)


def matmul_rate(calib: Calibration, shapes: Sequence, dtype: torch.dtype) -> None:
    """Adds each shape's lm_head matmul rate (FLOP/s of hidden [T, H] @ weight.T [H, V] in ``dtype``)."""
    for s in shapes:
        if s.label in calib.matmul_flops_per_s:
            continue
        a = torch.randn(s.tokens, s.hidden, device=calib.device).to(dtype)
        b = torch.randn(s.vocab, s.hidden, device=calib.device).to(dtype)
        ms = _time_ms(functools.partial(torch.matmul, a, b.t()), calib.device)
        calib.matmul_flops_per_s[s.label] = 2 * s.tokens * s.hidden * s.vocab / (ms / 1e3)
        del a, b


PHASE_FLOPS = {"forward": 2, "backward": 4, "forward+backward": 6}  # x valid x H x V: the lm_head's products


def derive(records, calib: Optional[Calibration], ce_names: Sequence[str]) -> None:
    """Fill the derived columns of every ok record in place: ``model_bytes``, ``achieved_bytes_per_s``,
    ``copy_fraction`` (loss table), ``matmul_floor_ms`` / ``floor_fraction`` (step table) and
    ``x_fastest_ce`` (time / the fastest CE provider's time, same table, shape and phase)."""
    fastest: Dict = {}
    for r in records:
        if r["status"] == "ok" and r["time_ms_p50"] is not None and r["provider"] in ce_names:
            key = (r["table"], r["shape"], r["phase"])
            if key not in fastest or r["time_ms_p50"] < fastest[key][0]:
                fastest[key] = (r["time_ms_p50"], r["provider"])
    for r in records:
        if r["status"] != "ok":
            continue
        t = r["time_ms_p50"]
        b = r.get("model_bytes")
        if r["table"] == "loss" and t and b is not None and calib is not None:  # the step is bound by its matmuls
            r["achieved_bytes_per_s"] = b / (t / 1e3)
            r["copy_fraction"] = r["achieved_bytes_per_s"] / calib.copy_bytes_per_s
        rate = calib.matmul_flops_per_s.get(r["shape"]) if calib is not None else None
        if r["table"] == "step" and rate:
            r["matmul_floor_ms"] = PHASE_FLOPS[r["phase"]] * r["valid_tokens"] * r["hidden"] * r["vocab"] / rate * 1e3
            if t:
                r["floor_fraction"] = r["matmul_floor_ms"] / t
        best = fastest.get((r["table"], r["shape"], r["phase"]))
        if t and best:
            r["x_fastest_ce"], r["fastest_ce"] = t / best[0], best[1]
