"""GEM backward: a 2-D grid over (rows, vocabulary blocks); each program reads its block of logits
once and writes its block of gradient once, from the per-row statistics of the forward.

d loss / d t_k = q_k w_k - [k == y] y_coef + 2 s lse exp(t_k - lse), with
q_k = exp((t_k - m) / beta - log s0), then chained through the logit transforms and multiplied by
the row's upstream gradient. The gradient may be written over the logits themselves (in-place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..options import NUM_STATS
from ._common import grad_block, transform_logits
from .config import BACKWARD, MAX_GRID_Y


@triton.jit
def _gem_bwd_kernel(
    logits_ptr,
    labels_ptr,
    stats_ptr,
    grad_loss_ptr,
    grad_ptr,
    V,
    stride_row,
    stride_stats,
    stride_grad_loss,
    stride_grad_row,
    vocab_start,
    ignore_index,
    inv_beta,
    z_loss_scale,
    logit_scale,
    softcap,
    LOGSIGMOID: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    label = tl.load(labels_ptr + row).to(tl.int64)
    out_ptr = grad_ptr + row * stride_grad_row + offs
    if label == ignore_index:
        tl.store(out_ptr, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=mask)
    else:
        st = stats_ptr + row * stride_stats
        m = tl.load(st + 0)
        log_s0 = tl.load(st + 1)
        y_coef = tl.load(st + 2)
        ty = 0.0
        lse = 0.0
        if LOGSIGMOID:
            ty = tl.load(st + 3)
        if Z_LOSS:
            lse = tl.load(st + 4)
        g_up = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        z = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = transform_logits(z, logit_scale, softcap, SCALE, SOFTCAP)
        g = grad_block(t, offs == label - vocab_start, m, log_s0, y_coef, ty, lse, inv_beta, z_loss_scale,
                       logit_scale, softcap, LOGSIGMOID, Z_LOSS, SCALE, SOFTCAP)
        g = g * g_up
        tl.store(out_ptr, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton_op("gem_kernels::gem_bwd", mutates_args={"grad_logits"})
def gem_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_logits: torch.Tensor,
    vocab_start: int,
    ignore_index: int,
    beta: float,
    logsigmoid: bool,
    z_loss_scale: float,
    logit_scale: float,
    softcap: float,
) -> None:
    """Writes d(sum_i grad_loss_i * loss_i)/d logits into ``grad_logits`` [N, V] (which may be
    ``logits`` itself). logits [N, V] unit column stride; labels [N]; stats [N, 5] fp32
    (options.S_*); grad_loss [N] any stride (0 for an expanded scalar). ``softcap`` <= 0: none.
    """
    N, V = logits.shape
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(f"gem_backward: labels must be contiguous of shape ({N},), got strides {labels.stride()}")
    if grad_logits.shape != logits.shape or (grad_logits.stride(1) != 1 and V > 1):
        raise ValueError("gem_backward: grad_logits must match logits' shape with unit column stride")
    if stats.shape != (N, NUM_STATS) or stats.dtype != torch.float32:
        raise ValueError(f"gem_backward: stats must be fp32 of shape ({N}, {NUM_STATS})")
    if grad_loss.shape != (N,):
        raise ValueError(f"gem_backward: grad_loss must have shape ({N},), got {tuple(grad_loss.shape)}")
    if N == 0 or V == 0:
        return
    cfg = BACKWARD
    block_v = min(cfg.block_v, max(16, triton.next_power_of_2(V)))
    n_blocks = triton.cdiv(V, block_v)
    if n_blocks > MAX_GRID_Y:
        raise ValueError(f"gem_backward: vocabulary of {V} needs {n_blocks} blocks, over the grid limit")
    wrap_triton(_gem_bwd_kernel)[(N, n_blocks)](
        logits,
        labels,
        stats,
        grad_loss,
        grad_logits,
        V,
        logits.stride(0),
        stats.stride(0),
        grad_loss.stride(0),
        grad_logits.stride(0),
        vocab_start,
        ignore_index,
        1.0 / beta,
        z_loss_scale,
        logit_scale,
        softcap if softcap > 0 else 1.0,
        LOGSIGMOID=logsigmoid,
        Z_LOSS=z_loss_scale != 0.0,
        SCALE=logit_scale != 1.0 and softcap <= 0,  # the softcap transform applies the scale itself
        SOFTCAP=softcap > 0,
        BLOCK_V=block_v,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
