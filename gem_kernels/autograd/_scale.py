"""Rescaling of gradients precomputed in the forward of a reduced loss, without host reads.

The forward computes the gradients with d(reduced loss)/d(per-token loss) folded in; backward
multiplies them by upstream / that factor. Shared by the eager autograd Function and the
torch.compile custom operators.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._paths import triton_available, triton_ops


def scale_grads_(grads, scale: torch.Tensor) -> None:
    """Multiply each precomputed gradient in place by the 0-d tensor ``scale`` without reading it
    on the host. Low-precision gradients are multiplied in fp32, as a Python-float factor would be:
    multiplying a bf16 tensor by a 0-d fp32 tensor would first round the factor itself to bf16
    (e.g. 1/3 by 2^-9). On CUDA one Triton kernel per gradient does it in one pass and skips it on
    the device when the factor is 1 (ops/grad_scale.py); elsewhere (CPU, float64, non-contiguous)
    PyTorch does it over fp32 slices of ``_slice_elements`` (a small temporary)."""
    factor = None
    for g in grads:
        if g is None:
            continue
        if _kernel_scales(g):
            if factor is None:
                factor = scale.to(torch.float32).reshape(1)
            triton_ops().scale_grad_(g, factor)
            continue
        if g.dtype in (torch.float32, torch.float64):
            g.mul_(scale.to(g.dtype))
            continue
        flat = g.view(-1)
        s32 = scale.to(torch.float32)
        step = _slice_elements(flat.numel())
        tmp = torch.empty(step, dtype=torch.float32, device=g.device)
        for a in range(0, flat.numel(), step):
            part = flat[a : a + step]
            t = tmp[: part.numel()]
            t.copy_(part).mul_(s32)
            part.copy_(t)


def _kernel_scales(g: torch.Tensor) -> bool:
    """The one-pass kernel serves CUDA gradients in a kernel dtype, stored contiguously."""
    return (
        g.is_cuda
        and g.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and g.is_contiguous()
        and triton_available()
    )


def scale_rows_(g: torch.Tensor, row_scale: torch.Tensor) -> None:
    """Multiply each row of ``g`` [N, V] in place by ``row_scale`` [N] (fp32), in fp32 for
    low-precision ``g`` (over row blocks of at most SCALE_SLICE elements), so that each entry is
    rounded once, as in scale_grads_; casting the factors to bf16 first would bias every row
    (1/3 becomes 0.33398, +0.2%)."""
    if g.dtype in (torch.float32, torch.float64):
        g.mul_(row_scale.to(g.dtype)[:, None])
        return
    rows = max(1, _slice_elements(g.numel()) // max(g.shape[1], 1))
    for a in range(0, g.shape[0], rows):
        part = g[a : a + rows]
        part.copy_(part.float().mul_(row_scale[a : a + rows, None].float()))


# 2^20 elements (4 MiB of fp32) per slice of scale_grads_: small next to the gradients it scales.
SCALE_SLICE = 1 << 20


def _slice_elements(numel: int) -> int:
    """Elements per fp32 slice: at most SCALE_SLICE and at most an eighth of the gradient (as the
    torch path bounds its row blocks), so the temporary stays small next to a small gradient too;
    at least 4,096 so that tiny gradients take few steps."""
    return max(1, min(numel, SCALE_SLICE, max(numel // 8, 1 << 12)))


def upstream_scale(grad_loss: torch.Tensor, rows: Optional[torch.Tensor], token_scale) -> torch.Tensor:
    """0-d float64 factor (upstream of the reduced loss) / token_scale, with no host read."""
    up = _uniform_upstream(grad_loss, rows).to(torch.float64)
    return up / torch.as_tensor(token_scale, dtype=torch.float64, device=up.device)


def _uniform_upstream(grad_loss: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The single upstream value of a reduced loss (0-d). The functional layer reduces right after
    the Function, so grad_loss is an expanded scalar; anything else is refused, never mis-scaled."""
    if grad_loss.numel() == 0:
        return grad_loss.new_zeros(())
    if grad_loss.stride(0) == 0:
        return grad_loss[0]
    g = grad_loss if rows is None else grad_loss.index_select(0, rows)
    if g.numel() and not bool((g == g[0]).all()):
        raise RuntimeError(
            "fused_linear_gem_loss: per-token upstream gradients need reduction='none' "
            "(the gradients of a reduced loss are precomputed for one scalar)"
        )
    return g[0] if g.numel() else grad_loss.new_zeros(())
