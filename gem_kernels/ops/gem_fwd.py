"""GEM forward: one streaming pass over each logits row, writing six fp32 partial sums per row.

Per row (transformed logits t, label logit t_y, e_j = exp((t_j - m) / beta)):
    m = max t, s0 = sum e, s1 = sum e w, s2 = sum e w (t - t_y), sce = sum exp(t - m), t_y
with the sums rescaled whenever the running max grows. With METRICS (return_metrics) two more
columns: sent = sum exp(t - m)(t - m), rescaled with sce (plus a shift when the max grows), and the
global id of the first (lowest) column where t reaches m. The logits are read exactly once; rows
whose label is ignore_index are not read at all.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..options import NUM_PARTIALS, NUM_PARTIALS_METRICS
from ._common import transform_logits
from .config import FORWARD

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gem_fwd_kernel(
    logits_ptr,
    labels_ptr,
    label_logit_ptr,
    partials_ptr,
    V,
    stride_row,
    stride_part,
    vocab_start,
    ignore_index,
    inv_beta,
    logit_scale,
    softcap,
    HAS_LABEL_LOGIT: tl.constexpr,
    LOGSIGMOID: tl.constexpr,
    NEED_LSE: tl.constexpr,
    METRICS: tl.constexpr,
    SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = partials_ptr + row * stride_part
    m = float("-inf")
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    sce = 0.0
    sent = 0.0
    amax = -1.0
    ty = 0.0
    if label != ignore_index:
        row_ptr = logits_ptr + row * stride_row
        if HAS_LABEL_LOGIT:
            ty = tl.load(label_logit_ptr + row).to(tl.float32)
        else:
            zy = tl.load(row_ptr + (label - vocab_start)).to(tl.float32)
            ty = transform_logits(zy, logit_scale, softcap, SCALE, SOFTCAP)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            t = transform_logits(z, logit_scale, softcap, SCALE, SOFTCAP)
            t = tl.where(mask, t, float("-inf"))
            if METRICS:
                # One reduction gives the block max and its first index (ties: lowest index).
                blk_max, blk_arg = tl.max(t, 0, return_indices=True, return_indices_tie_break_left=True)
            else:
                blk_max = tl.max(t, 0)
            m_new = tl.maximum(m, blk_max)
            # -inf logits (masked vocabulary) must add 0, not NaN from inf - inf or 0 * inf.
            finite = t > float("-inf")
            grew = m_new > m
            alpha = tl.where(grew, tl.exp((m - m_new) * inv_beta), 1.0)
            e = tl.where(finite, tl.exp((t - m_new) * inv_beta), 0.0)
            diff = tl.where(finite, t - ty, 0.0)
            if LOGSIGMOID:
                ew = e * tl.sigmoid(diff * 0.01)
                s1 = s1 * alpha + tl.sum(ew, 0)
            else:
                ew = e
            s0 = s0 * alpha + tl.sum(e, 0)
            s2 = s2 * alpha + tl.sum(ew * diff, 0)
            if NEED_LSE:
                alpha_ce = tl.where(grew, tl.exp(m - m_new), 1.0)
                ex = tl.where(finite, tl.exp(t - m_new), 0.0)
                if METRICS:
                    # Re-centre the old sum on m_new; sce = 0 (nothing finite yet) adds 0, not -inf * 0.
                    shift = tl.where(sce > 0.0, m - m_new, 0.0) * sce
                    sent = (sent + shift) * alpha_ce + tl.sum(ex * tl.where(finite, t - m_new, 0.0), 0)
                    # A later block wins only with a strictly larger max: the row's first maximal column.
                    amax = tl.where(grew, (blk_arg + start + vocab_start).to(tl.float32), amax)
                sce = sce * alpha_ce + tl.sum(ex, 0)
            m = m_new
        if not LOGSIGMOID:
            s1 = s0
    tl.store(out + 0, m)
    tl.store(out + 1, s0)
    tl.store(out + 2, s1)
    tl.store(out + 3, s2)
    tl.store(out + 4, sce)
    tl.store(out + 5, ty)
    if METRICS:
        tl.store(out + 6, sent)
        tl.store(out + 7, amax)


@triton_op("gem_kernels::gem_fwd", mutates_args=())
def gem_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_logits: Optional[torch.Tensor],
    vocab_start: int,
    ignore_index: int,
    beta: float,
    logsigmoid: bool,
    need_lse: bool,
    logit_scale: float,
    softcap: float,
    metrics: bool = False,
) -> torch.Tensor:
    """logits [N, V] (unit column stride, any row stride; fp32/bf16/fp16), labels [N] integer,
    label_logits [N] fp32 or None (then t_y is read from the row) -> partials [N, 6] fp32, or
    [N, 8] with ``metrics`` (options.P_*; ``metrics`` needs ``need_lse``).

    ``softcap`` <= 0 means no softcap. Labels must already be validated: a non-ignored label
    must lie in [vocab_start, vocab_start + V) unless label_logits is given.
    """
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(f"gem_forward: logits must be 2-D with unit column stride, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gem_forward: logits dtype must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    N, V = logits.shape
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(f"gem_forward: labels must be contiguous of shape ({N},), got shape "
                         f"{tuple(labels.shape)} strides {labels.stride()}")
    if metrics and not need_lse:
        raise ValueError("gem_forward: metrics=True needs need_lse=True (the entropy uses the lse sum)")
    partials = torch.empty(N, NUM_PARTIALS_METRICS if metrics else NUM_PARTIALS, dtype=torch.float32,
                           device=logits.device)
    if N == 0:
        return partials
    cfg = FORWARD
    wrap_triton(_gem_fwd_kernel)[(N,)](
        logits,
        labels,
        label_logits if label_logits is not None else partials,
        partials,
        V,
        logits.stride(0),
        partials.stride(0),
        vocab_start,
        ignore_index,
        1.0 / beta,
        logit_scale,
        softcap if softcap > 0 else 1.0,
        HAS_LABEL_LOGIT=label_logits is not None,
        LOGSIGMOID=logsigmoid,
        NEED_LSE=need_lse,
        METRICS=metrics,
        SCALE=logit_scale != 1.0,
        SOFTCAP=softcap > 0,
        BLOCK_V=min(cfg.block_v, max(16, triton.next_power_of_2(V))),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return partials
