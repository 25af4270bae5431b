"""GEM gradient-in-forward: per row, the statistics pass and then the row's gradient, in one program.

Loop 1 is the statistics-only forward's pass (``_common.row_partials``: running max and the sums,
written as the same six partials). Loop 2 reads the row again and writes

    d loss / d z = (q w - [k == y] s1 / s0 + 2 s lse softmax(t)) * dt/dz * row_scale

where ``row_scale`` is the row's factor read from a device tensor (the reduction's per-token
weight: 1 / n_valid for "mean", 1 / num_items_in_batch, 1 for "sum"; a 0-stride tensor for one
scalar), so no host synchronisation is needed. The row is re-read right after it was read, from its
end backwards (most recently loaded lines first), so on a GPU the second read is served from L2
while the rows in flight fit in it (see ops/config.py). DRAM traffic is then about one read and one
write of the logits for forward and backward together. ``grad`` may be the logits themselves
(in-place: each block is read before it is overwritten). Ignored rows are not read; their gradient
is written as zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..options import NUM_PARTIALS, NUM_PARTIALS_METRICS, GEMOptions
from ._args import kernel_args
from ._common import grad_block, row_autotune, row_partials, store_partials, transform_logits
from .config import FORWARD_GRAD_CONFIGS
from .gem_fwd import SUPPORTED_DTYPES


@row_autotune(FORWARD_GRAD_CONFIGS, restore_value=["grad_ptr"])
@triton.jit
def _gem_fwd_grad_kernel(
    logits_ptr,
    labels_ptr,
    row_scale_ptr,
    partials_ptr,
    grad_ptr,
    V,
    stride_row,
    stride_row_scale,
    stride_part,
    stride_grad_row,
    vocab_start,
    ignore_index,
    inv_beta,
    z_loss_scale,
    logit_scale,
    softcap,
    LOGSIGMOID: tl.constexpr,
    NEED_LSE: tl.constexpr,
    METRICS: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    out = partials_ptr + row * stride_part
    grad_row = grad_ptr + row * stride_grad_row
    # Loop 2 is a plain stream (no accumulators): two 16-byte vectors per thread per step keep it at
    # about the registers of loop 1 (ops/config.py).
    STEP: tl.constexpr = 2 * LANES
    lanes = tl.arange(0, STEP)
    n_blocks = tl.cdiv(V, STEP)
    if label == ignore_index:
        zeros = tl.zeros([STEP], dtype=grad_ptr.dtype.element_ty)
        for i in range(0, n_blocks):
            offs = i * STEP + lanes
            tl.store(grad_row + offs, zeros, mask=offs < V)
        store_partials(out, float("-inf"), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1, vocab_start, METRICS)
    else:
        row_ptr = logits_ptr + row * stride_row
        col = label - vocab_start
        ty = transform_logits(tl.load(row_ptr + col).to(tl.float32), logit_scale, softcap, SCALE, SOFTCAP)
        m, s0, s1, s2, sce, sent, amax = row_partials(
            row_ptr,
            V,
            ty,
            inv_beta,
            logit_scale,
            softcap,
            LOGSIGMOID,
            NEED_LSE,
            METRICS,
            SCALE,
            SOFTCAP,
            BLOCK_V,
            LANES,
        )
        store_partials(out, m, s0, s1, s2, sce, ty, sent, amax, vocab_start, METRICS)
        # The statistics of torch_ops.stats.finalize, for this row.
        log_s0 = tl.log(s0)
        y_coef = s1 / s0
        lse = 0.0
        if Z_LOSS:
            lse = m + tl.log(sce)
        row_scale = tl.load(row_scale_ptr + row * stride_row_scale).to(tl.float32)
        for i in range(0, n_blocks):
            offs = (n_blocks - 1 - i) * STEP + lanes  # backwards: the most recently read block first
            mask = offs < V
            z = tl.load(row_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
            t = transform_logits(z, logit_scale, softcap, SCALE, SOFTCAP)
            g = grad_block(
                t,
                offs == col,
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
            tl.store(grad_row + offs, (g * row_scale).to(grad_ptr.dtype.element_ty), mask=mask)


@triton_op("gem_kernels::gem_fwd_grad", mutates_args={"grad_logits"})
def _gem_fwd_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor,
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
) -> torch.Tensor:
    """The operator (torch.compile traces it): the scalars of ``_args.KernelArgs`` in its order."""
    N, V = logits.shape
    partials = torch.empty(
        N, NUM_PARTIALS_METRICS if METRICS else NUM_PARTIALS, dtype=torch.float32, device=logits.device
    )
    if N == 0 or V == 0:
        return partials
    wrap_triton(_gem_fwd_grad_kernel)[(N,)](
        logits,
        labels,
        row_scale,
        partials,
        grad_logits,
        V,
        logits.stride(0),
        row_scale.stride(0),
        partials.stride(0),
        grad_logits.stride(0),
        vocab_start,
        ignore_index,
        inv_beta,
        z_loss_scale,
        logit_scale,
        softcap,
        LOGSIGMOID=LOGSIGMOID,
        NEED_LSE=NEED_LSE,
        METRICS=METRICS,
        Z_LOSS=Z_LOSS,
        SCALE=SCALE,
        SOFTCAP=SOFTCAP,
    )
    return partials


def gem_forward_grad(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor, opts: GEMOptions, out: torch.Tensor
) -> torch.Tensor:
    """Statistics and gradient of every row in one kernel: the launcher of ``_gem_fwd_grad_kernel``.

    Args:
        logits: [N, V] fp32 / bf16 / fp16, unit column stride, any row stride.
        labels: [N] contiguous integer, validated: a non-ignored label lies in
            [opts.vocab_start, opts.vocab_start + V).
        row_scale: [N] fp32, any stride (0 for one scalar): the factor each row's gradient is
            multiplied by.
        opts: the call's GEMOptions (what the kernel reads comes from ``_args.kernel_args``).
        out: [N, V] in the logits' dtype with unit column stride; may be ``logits`` itself.

    Returns:
        partials [N, opts.num_partials] fp32 (options.P_*), the same as gem_forward's; writes
        d(sum_i row_scale_i * loss_i)/d logits into ``out``.

    Raises:
        ValueError / TypeError: a tensor of another shape, dtype or layout than above.
    """
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(
            f"gem_forward_grad: logits must be 2-D with unit column stride, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gem_forward_grad: logits dtype must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    N, V = logits.shape
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(
            f"gem_forward_grad: labels must be contiguous of shape ({N},), got shape "
            f"{tuple(labels.shape)} strides {labels.stride()}"
        )
    if row_scale.shape != (N,) or row_scale.dtype != torch.float32:
        raise ValueError(
            f"gem_forward_grad: row_scale must be fp32 of shape ({N},), got {row_scale.dtype} {tuple(row_scale.shape)}"
        )
    if out.shape != logits.shape or out.dtype != logits.dtype or (out.stride(1) != 1 and V > 1):
        raise ValueError("gem_forward_grad: out must match logits' shape and dtype with unit column stride")
    return _gem_fwd_grad(logits, labels, row_scale, out, *kernel_args(opts))
