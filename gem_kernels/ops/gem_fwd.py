"""GEM statistics-only forward: one streaming pass over each logits row, writing six fp32 partial
sums per row (no gradient). Used under no_grad / evaluation, for vocabulary shards (whose partials
are combined across ranks before any gradient), and wherever the split forward/backward is kept.

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

from ..options import NUM_PARTIALS, NUM_PARTIALS_METRICS, GEMOptions
from ._args import kernel_args
from ._common import row_autotune, row_partials, store_partials, transform_logits
from .config import FORWARD_CONFIGS

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@row_autotune(FORWARD_CONFIGS)
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
    LANES: tl.constexpr,
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
    amax = -1
    ty = 0.0
    if label != ignore_index:
        row_ptr = logits_ptr + row * stride_row
        if HAS_LABEL_LOGIT:
            ty = tl.load(label_logit_ptr + row).to(tl.float32)
        else:
            zy = tl.load(row_ptr + (label - vocab_start)).to(tl.float32)
            ty = transform_logits(zy, logit_scale, softcap, SCALE, SOFTCAP)
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


@triton_op("gem_kernels::gem_fwd", mutates_args=())
def _gem_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_logits: Optional[torch.Tensor],
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
    if N == 0:
        return partials
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
        inv_beta,
        logit_scale,
        softcap,
        HAS_LABEL_LOGIT=label_logits is not None,
        LOGSIGMOID=LOGSIGMOID,
        NEED_LSE=NEED_LSE,
        METRICS=METRICS,
        SCALE=SCALE,
        SOFTCAP=SOFTCAP,
    )
    return partials


def gem_forward(
    logits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions, label_logits: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-row partial sums of the GEM forward: the launcher of ``_gem_fwd_kernel``.

    Args:
        logits: [N, V] fp32 / bf16 / fp16, unit column stride, any row stride (columns
            [opts.vocab_start, opts.vocab_start + V) of the vocabulary).
        labels: [N] contiguous integer, validated: a non-ignored label lies in
            [vocab_start, vocab_start + V) unless ``label_logits`` is given.
        opts: the call's GEMOptions (what the kernel reads comes from ``_args.kernel_args``).
        label_logits: None (t_y is read from the row), or [N] fp32 transformed label logits (a
            vocabulary shard whose label may sit on another rank).

    Returns:
        partials [N, opts.num_partials] fp32 (options.P_*).

    Raises:
        ValueError / TypeError: logits not 2-D with unit column stride or not a kernel dtype; labels
            not contiguous of shape [N].
    """
    if logits.dim() != 2 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(
            f"gem_forward: logits must be 2-D with unit column stride, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gem_forward: logits dtype must be one of {SUPPORTED_DTYPES}, got {logits.dtype}")
    N = logits.shape[0]
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(
            f"gem_forward: labels must be contiguous of shape ({N},), got shape "
            f"{tuple(labels.shape)} strides {labels.stride()}"
        )
    return _gem_fwd(logits, labels, label_logits, *kernel_args(opts))
