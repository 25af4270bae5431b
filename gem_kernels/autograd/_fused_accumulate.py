"""The fused path's d weight / d bias accumulators: fp32 sums across chunks, cast once at the end,
without ever holding a full fp32 [V, H] buffer beside the full low-precision result.

For a bf16 / fp16 weight the returned gradient [V, H] (2 bytes per element) is allocated first and
its own storage holds the fp32 sums of the first half of the vocabulary (V // 2 rows x 4 bytes fit
in V rows x 2 bytes); a second fp32 buffer holds the other half. At the end the first half is
converted in place, front to back, in slabs [a, b) with b <= 2a, so that each slab's 2-byte rows
land only on fp32 rows that were already converted (the first slab goes through a small
temporary); then the second half is cast into its rows and its buffer freed. Peak: 2 x the
weight's bytes (as the fp32 accumulator alone was), instead of 3 x (the fp32 accumulator plus its
cast). The arithmetic is unchanged: fp32 sums, one rounding to the parameter dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def fp32_out_addmm(device: torch.device) -> str:
    """How ``torch.addmm(acc_fp32, a_lowp, b_lowp, out_dtype=float32, out=acc)`` behaves on this
    device (probed once): "" when it does not run (CPU, torch < 2.8); "beta0" when it runs and
    ``beta=0`` ignores the buffer's old contents (NaN included), so the first chunk needs no zero
    fill; "add" when it runs but beta=0 is not trusted (the buffer is zero-filled first). The
    low-precision product then accumulates straight into the fp32 buffer with no temporary."""
    if device.type != "cuda":
        return ""
    try:
        a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        if not bool((acc == 2.0).all()):
            return ""
        acc.fill_(float("nan"))
        torch.addmm(acc, a, a, beta=0, out_dtype=torch.float32, out=acc)
        return "beta0" if bool((acc == 2.0).all()) else "add"
    except (RuntimeError, TypeError):
        return ""


# First slab of the in-place conversion (through a temporary): at most 64 Ki elements and 1/8 of
# the first half, then slabs doubling in size (a few more casts, no more memory).
_FIRST_SLAB_ELEMENTS = 1 << 16


class Accumulator:
    """grad_weight [V, H] / grad_bias [V] summed in fp32 over chunks (in the parameter dtype when
    that is fp32 / fp64: the sum is then the returned gradient itself)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], need_w: bool, need_b: bool, chunk_rows: int):
        V, H = weight.shape
        dev, dt = weight.device, weight.dtype
        self.dtype, self.H = dt, H
        wide = dt in (torch.float32, torch.float64)
        self.started = False
        self.parts = []  # (fp32 or wide view, first row, end row)
        self.res = None
        self.tmp = None
        self.gb = torch.zeros(V, dtype=dt if wide else torch.float32, device=dev) if need_b else None
        if not need_w:
            return
        if wide:
            self.res = torch.empty(V, H, dtype=dt, device=dev)
            self.parts = [(self.res, 0, V)]
        else:
            va = V // 2
            flat = torch.empty(V * H + (V * H) % 2, dtype=dt, device=dev)  # even: viewable as fp32
            self.res = flat[: V * H].view(V, H)
            self.parts = [
                (flat.view(torch.float32)[: va * H].view(va, H), 0, va),
                (torch.empty(V - va, H, dtype=torch.float32, device=dev), va, V),
            ]
        mode = "" if wide else fp32_out_addmm(dev)
        self.direct = wide or bool(mode)
        if mode == "add":
            for acc, _, _ in self.parts:
                acc.zero_()
            self.started = True  # every chunk adds
        if not self.direct:
            # Low-precision product of a vocabulary slice, added into the fp32 sums: slices of
            # about chunk_rows * V elements keep this temporary no bigger than the logits chunk.
            self.v_step = max(1, min(V, (chunk_rows * V) // max(H, 1)))
            self.tmp = torch.empty(self.v_step, H, dtype=dt, device=dev)

    def add(self, dz: torch.Tensor, x: torch.Tensor) -> None:
        """dz [c, V] (dLoss/dlogits of the chunk), x [c, H]. The first call writes (no zero fill,
        no read of the buffer), later ones add."""
        first, self.started = not self.started, True
        for acc, lo, hi in self.parts:
            if hi == lo:
                continue
            d = dz[:, lo:hi].t()
            if self.direct and acc.dtype == dz.dtype:
                acc.addmm_(d, x, beta=0 if first else 1)
            elif self.direct:
                torch.addmm(acc, d, x, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
            else:
                for s in range(0, hi - lo, self.v_step):
                    e = min(s + self.v_step, hi - lo)
                    tmp = self.tmp[: e - s]
                    torch.mm(d[s:e], x, out=tmp)
                    if first:
                        acc[s:e].copy_(tmp)
                    else:
                        acc[s:e].add_(tmp)
        if self.gb is not None:
            self.gb.add_(dz.sum(0, dtype=self.gb.dtype))

    def result(self):
        """(grad_weight, grad_bias) in the parameter dtype (the single rounding of the fp32 sums)."""
        self.tmp = None
        gw = self.res
        if gw is not None and not self.started:
            gw.zero_()  # no valid token: zero gradient
        elif gw is not None and gw.dtype != self.parts[0][0].dtype:
            self._convert_in_place()
        self.parts, self.res = [], None
        gb = self.gb
        if gb is not None and gb.dtype != self.dtype:
            gb = gb.to(self.dtype)
        self.gb = None
        return gw, gb

    def _convert_in_place(self) -> None:
        (a32, _, va), (b32, _, _) = self.parts
        res = self.res
        if va:
            a = max(1, min(va // 8, _FIRST_SLAB_ELEMENTS // self.H))
            res[:a].copy_(a32[:a].to(self.dtype))  # overlaps its own source: via a temporary
            while a < va:
                # 2-byte rows [a, b) occupy bytes [2aH, 2bH) <= 4aH, below fp32 row a: only rows
                # already converted are overwritten.
                b = min(2 * a, va)
                res[a:b].copy_(a32[a:b])
                a = b
        res[va:].copy_(b32)  # lands on the first half's fp32 rows [va/2, va), converted above
        self.parts = []
