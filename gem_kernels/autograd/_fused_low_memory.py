"""Second pass of the fused path's low-memory mode: d weight and d bias per vocabulary slice.

The first pass (``_chunk_loop`` over token chunks) gives the loss, the row statistics and
d hidden, with no d weight accumulator. Then, for each slice [s, e) of the vocabulary:

    Z = x @ W[s:e].T (+ b[s:e])        [rows, e - s], every token that takes part at once
    dZ over Z, in place                 the GEM backward on a vocabulary slice (vocab_start + s),
                                        from the saved row statistics: exact, no re-normalisation
    grad_weight[s:e] = dZ.T @ x         ONE matmul over all tokens, fp32 accumulation inside it,
                                        written straight in the parameter dtype (one rounding)
    grad_bias[s:e] = dZ.sum(0)          in fp32, then cast

So no [V, H] buffer exists besides the returned gradient, and the sums are as accurate as the
fp32 accumulator's. Cost: the logits are computed twice, 8 instead of 6 x valid x H x V matmul
FLOPs (the same count the deferred "none" reduction already pays). Slice sizes and whether the
valid rows are gathered come from ``chunk_policy.vocab_pass_plan``.

On CUDA, cuBLAS accumulates a bf16 / fp16 GEMM in fp32; torch's default
``allow_bf16_reduced_precision_reduction=True`` would only allow reduced-precision split-K
reductions, which these slices' shapes (hundreds of output tiles) do not use.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..chunk_policy import vocab_pass_plan
from ..options import GEMOptions
from ._paths import grad_into


def vocab_slice_grads(
    hidden2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: Optional[torch.Tensor],
    labels_v: torch.Tensor,
    stats_v: torch.Tensor,
    row_grad: torch.Tensor,
    opts: GEMOptions,
    *,
    need_gw: bool,
    need_gb: bool,
):
    """(grad_weight [V, H] or None, grad_bias [V] or None) in the parameter dtype.

    hidden2d [N, H]; rows [n_valid] int64 indices of the valid rows (None: all valid); labels_v,
    stats_v [n_valid, 5], row_grad [n_valid] (per-token upstream factor, may be 0-stride) of the
    valid rows; dLoss/dz comes from the GEM backward of ``opts.impl``, written over z.
    """
    N, H = hidden2d.shape
    V = weight.shape[0]
    dev, dt = weight.device, weight.dtype
    gw = torch.empty(V, H, dtype=dt, device=dev) if need_gw else None
    gb = torch.empty(V, dtype=dt, device=dev) if need_gb else None
    n_valid = labels_v.shape[0]
    if not (need_gw or need_gb):
        return gw, gb
    if n_valid == 0:
        return (None if gw is None else gw.zero_()), (None if gb is None else gb.zero_())
    plan = vocab_pass_plan(n_valid, N, H, V)
    if rows is None:
        x, labels, stats, rg = hidden2d, labels_v, stats_v, row_grad
    elif plan.gather:
        x = hidden2d.index_select(0, rows)
        labels, stats, rg = labels_v, stats_v, row_grad
    else:
        # All rows take part; ignored ones carry ignore_index, zero statistics and zero upstream,
        # and the GEM backward writes dZ = 0 for them.
        x = hidden2d
        labels = torch.full((N,), opts.ignore_index, dtype=labels_v.dtype, device=labels_v.device)
        labels.index_copy_(0, rows, labels_v)
        stats = stats_v.new_zeros(N, stats_v.shape[1]).index_copy_(0, rows, stats_v)
        rg = row_grad.new_zeros(N).index_copy_(0, rows, row_grad.expand(n_valid).contiguous())
    n = x.shape[0]
    zflat = torch.empty(n * min(plan.cols, V), dtype=dt, device=dev)
    for s in range(0, V, plan.cols):
        e = min(s + plan.cols, V)
        z = zflat[: n * (e - s)].view(n, e - s)  # contiguous even for the last, narrower slice
        w = weight[s:e]
        if bias is not None:
            torch.addmm(bias[s:e], x, w.t(), out=z)
        else:
            torch.mm(x, w.t(), out=z)
        grad_into(z, labels, stats, rg, dataclasses.replace(opts, vocab_start=opts.vocab_start + s), z)
        if gw is not None:
            torch.mm(z.t(), x, out=gw[s:e])
        if gb is not None:
            gb[s:e] = z.sum(0, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    return gw, gb
