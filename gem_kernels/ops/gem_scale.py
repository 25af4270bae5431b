"""Applying the upstream gradient to a gradient computed in the forward, decided on the device.

The gradient-in-forward kernel multiplied each row's gradient by ``token_scale`` (the reduction's
d reduced loss / d per-token loss). In backward, row i must end up multiplied by ``grad_loss[i]``
instead, i.e. rescaled by ``grad_loss[i] / token_scale``. One program per row reads the two scalars
and returns at once when they are equal (a mean or sum loss backpropagated as is: no pass over the
logits at all), so the decision needs no host synchronisation. Ignored rows keep their exact zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..options import GEMOptions
from .config import SCALE


@triton.jit
def _gem_scale_kernel(
    grad_ptr,
    labels_ptr,
    grad_loss_ptr,
    token_scale_ptr,
    V,
    stride_grad_row,
    stride_grad_loss,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label != ignore_index:
        up = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        ts = tl.load(token_scale_ptr).to(tl.float32)
        if up != ts:
            factor = up / ts
            grad_row = grad_ptr + row * stride_grad_row
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                g = tl.load(grad_row + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_row + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton_op("gem_kernels::gem_scale", mutates_args={"grad_logits"})
def _gem_scale(
    grad_logits: torch.Tensor,
    labels: torch.Tensor,
    grad_loss: torch.Tensor,
    token_scale: torch.Tensor,
    ignore_index: int,
) -> None:
    """The operator (torch.compile traces it)."""
    N, V = grad_logits.shape
    if N == 0 or V == 0:
        return
    wrap_triton(_gem_scale_kernel)[(N,)](
        grad_logits,
        labels,
        grad_loss,
        token_scale,
        V,
        grad_logits.stride(0),
        grad_loss.stride(0),
        ignore_index,
        BLOCK_V=min(SCALE.block_v, max(16, triton.next_power_of_2(V))),
        num_warps=SCALE.num_warps,
        num_stages=SCALE.num_stages,
    )


def gem_scale_rows(
    grad_logits: torch.Tensor,
    labels: torch.Tensor,
    grad_loss: torch.Tensor,
    token_scale: torch.Tensor,
    opts: GEMOptions,
) -> None:
    """grad_logits[i] *= grad_loss[i] / token_scale in place, for every row i whose label is not
    ``opts.ignore_index``, skipping (on the device) rows where the factor is exactly 1: the launcher
    of ``_gem_scale_kernel``.

    Args:
        grad_logits: [N, V] with unit column stride, scaled in place.
        labels: [N] contiguous integer.
        grad_loss: [N] any float dtype and stride (0 for an expanded scalar).
        token_scale: one-element fp32 tensor, non-zero: the factor the rows already carry.
        opts: the call's GEMOptions (only ignore_index is read).

    Raises:
        ValueError: a tensor of another shape, dtype or layout than above.
    """
    N, V = grad_logits.shape
    if labels.shape != (N,) or (N > 1 and labels.stride(0) != 1):
        raise ValueError(f"gem_scale_rows: labels must be contiguous of shape ({N},)")
    if grad_logits.stride(1) != 1 and V > 1:
        raise ValueError("gem_scale_rows: grad_logits must have unit column stride")
    if grad_loss.shape != (N,):
        raise ValueError(f"gem_scale_rows: grad_loss must have shape ({N},), got {tuple(grad_loss.shape)}")
    if token_scale.numel() != 1 or token_scale.dtype != torch.float32:
        raise ValueError("gem_scale_rows: token_scale must be a one-element fp32 tensor")
    _gem_scale(grad_logits, labels, grad_loss, token_scale, opts.ignore_index)
