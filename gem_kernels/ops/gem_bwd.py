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

from ..options import NUM_STATS, GEMOptions
from ._args import kernel_args
from ._common import S_LOGS0, S_LSE, S_M, S_TY, S_YCOEF, grad_block, transform_logits
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
        m = tl.load(st + S_M)
        log_s0 = tl.load(st + S_LOGS0)
        y_coef = tl.load(st + S_YCOEF)
        ty = 0.0
        lse = 0.0
        if LOGSIGMOID:
            ty = tl.load(st + S_TY)
        if Z_LOSS:
            lse = tl.load(st + S_LSE)
        g_up = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        z = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = transform_logits(z, logit_scale, softcap, SCALE, SOFTCAP)
        g = grad_block(
            t,
            offs == label - vocab_start,
            m,
            log_s0,
            y_coef,
            ty,
            lse,
            inv_beta,
            z_loss_scale,
            logit_scale,
            softcap,
            LOGSIGMOID,
            Z_LOSS,
            SCALE,
            SOFTCAP,
        )
        g = g * g_up
        tl.store(out_ptr, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton_op("gem_kernels::gem_bwd", mutates_args={"grad_logits"})
def _gem_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_logits: torch.Tensor,
    vocab_start: int,
    ignore_index: int,
    inv_beta: float,
    z_loss_scale: float,
    logit_scale: float,
    softcap: float,
    LOGSIGMOID: bool,
    Z_LOSS: bool,
    SCALE: bool,
    SOFTCAP: bool,
    NEED_LSE: bool,
    METRICS: bool,
) -> None:
    """The operator (torch.compile traces it): the scalars of ``_args.KernelArgs`` in its order."""
    N, V = logits.shape
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
        inv_beta,
        z_loss_scale,
        logit_scale,
        softcap,
        LOGSIGMOID=LOGSIGMOID,
        Z_LOSS=Z_LOSS,
        SCALE=SCALE,
        SOFTCAP=SOFTCAP,
        BLOCK_V=block_v,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def gem_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    opts: GEMOptions,
    out: torch.Tensor,
) -> torch.Tensor:
    """d(sum_i grad_loss_i * loss_i)/d logits from the row statistics: the launcher of ``_gem_bwd_kernel``.

    Args:
        logits: [N, V] fp32 / bf16 / fp16, unit column stride, any row stride.
        labels: [N] contiguous integer (validated, as for gem_forward).
        stats: [N, 5] fp32 row statistics (options.S_*, from torch_ops.finalize).
        grad_loss: [N] float, any stride (0 for an expanded scalar): each row's upstream gradient.
        opts: the call's GEMOptions (what the kernel reads comes from ``_args.kernel_args``).
        out: [N, V] with unit column stride, written; may be ``logits`` itself.

    Returns:
        ``out``.

    Raises:
        ValueError: a tensor of another shape or layout than above, or a vocabulary over the grid limit.
    """
    N, V = logits.shape
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(f"gem_backward: labels must be contiguous of shape ({N},), got strides {labels.stride()}")
    if out.shape != logits.shape or (out.stride(1) != 1 and V > 1):
        raise ValueError("gem_backward: out must match logits' shape with unit column stride")
    if stats.shape != (N, NUM_STATS) or stats.dtype != torch.float32:
        raise ValueError(f"gem_backward: stats must be fp32 of shape ({N}, {NUM_STATS})")
    if grad_loss.shape != (N,):
        raise ValueError(f"gem_backward: grad_loss must have shape ({N},), got {tuple(grad_loss.shape)}")
    _gem_bwd(logits, labels, stats, grad_loss, out, *kernel_args(opts))
    return out
