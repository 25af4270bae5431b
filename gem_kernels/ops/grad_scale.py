"""In-place scaling of a whole gradient by one factor held on the device, skipped there when it is 1.

The fused path computes d hidden, d weight and d bias during its forward with the reduction's
token weight folded in; backward multiplies them by (upstream / token weight), a 0-d tensor that
is exactly 1 when a mean or sum loss is backpropagated as is. Each program reads the factor first
and returns at once when it is 1, so that common case costs one scalar load per program instead of
a pass over the [V, H] weight gradient, and the decision needs no host synchronisation. Otherwise
each element is multiplied in fp32 and rounded once to the gradient's dtype (multiplying a bf16
tensor by a 0-d fp32 tensor in PyTorch would round the factor itself to bf16 first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .config import GRAD_SCALE

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _grad_scale_kernel(
    grad_ptr,
    factor_ptr,
    numel,
    BLOCK_V: tl.constexpr,
):
    factor = tl.load(factor_ptr)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = offs < numel
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton_op("gem_kernels::grad_scale", mutates_args={"grad"})
def scale_grad_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad *= factor in place, skipped on the device when factor == 1.

    grad: a contiguous float32 / bfloat16 / float16 tensor of any shape (a [V, H] weight gradient,
    [N, H] hidden gradient or [V] bias gradient). factor: a one-element float32 tensor on grad's
    device (the upstream / token-weight ratio, rounded to fp32 as the multiplication uses it).
    Raises ValueError for a non-contiguous grad or a factor that is not one fp32 element, TypeError
    for another grad dtype.
    """
    if grad.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scale_grad_: grad dtype must be one of {SUPPORTED_DTYPES}, got {grad.dtype}")
    if not grad.is_contiguous():
        raise ValueError("scale_grad_: grad must be contiguous")
    if factor.numel() != 1 or factor.dtype != torch.float32 or factor.device != grad.device:
        raise ValueError(
            f"scale_grad_: factor must be a one-element fp32 tensor on {grad.device}, got "
            f"{factor.dtype} {tuple(factor.shape)} on {factor.device}"
        )
    n = grad.numel()
    if n == 0:
        return
    wrap_triton(_grad_scale_kernel)[(triton.cdiv(n, GRAD_SCALE.block_v),)](
        grad,
        factor,
        n,
        BLOCK_V=GRAD_SCALE.block_v,
        num_warps=GRAD_SCALE.num_warps,
        num_stages=GRAD_SCALE.num_stages,
    )
