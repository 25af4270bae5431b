"""Autograd Functions for GEM over a logits matrix.

Both Functions take logits [N, V] and labels [N] and return (per-token loss [N], detached per-token
extras [N, opts.num_extras] (options.X_*: ce, then entropy and token accuracy with return_metrics)
or an empty tensor); reduction happens in the functional layer, so the upstream gradient reaching
backward is per token (a 0-stride expanded scalar for "mean" and "sum").
"""

from __future__ import annotations

from typing import Optional

import torch

from ..options import GEMOptions
from ..torch_ops import finalize, gem_forward_row_blocks, gem_grad_row_blocks, gem_partials
from . import vocab_parallel
from ._once import take_once
from ._paths import grad_into, triton_ops
from ._scale import scale_grads_, scale_rows_

_NONE = (None,) * 4  # no gradient for labels, opts, group and the last argument


def _outputs(ctx, loss, extras):
    if extras is None:
        extras = loss.new_empty(0)
    ctx.mark_non_differentiable(extras)
    return loss, extras


def _zeros_if_none(grad_loss: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    return grad_loss if grad_loss is not None else torch.zeros(n, dtype=torch.float32, device=like.device)


class GEMTritonFunction(torch.autograd.Function):
    """Triton path, two designs (docs/kernels.md):

    - gradient in forward (a reduced loss on one device, logits that need a gradient, not fp16): one
      kernel writes the statistics and the gradient of each row already multiplied by ``token_scale``
      (d reduced loss / d per-token loss, a 0-d fp32 device tensor); backward only rescales rows
      whose upstream differs from it, a check made on the device. One backward per forward: the
      gradient is handed to autograd without a copy (a second backward raises a clear error).
    - statistics-only forward + 2-D backward kernel (``token_scale`` None, i.e. reduction="none";
      vocabulary shards; fp16, whose gradient must carry the upstream factor, e.g. a GradScaler's
      2^16, before it is rounded; no_grad). Supports repeated backward unless in place.
    """

    @staticmethod
    def forward(ctx, logits, labels, opts: GEMOptions, group, token_scale=None):
        # token_scale is None under no_grad (the functional layer passes it only when grad mode is
        # on, which is off inside this method) and for reduction="none".
        valid = labels != opts.ignore_index
        ctx.opts = opts
        ctx.grad = None
        eager = ctx.needs_input_grad[0] and token_scale is not None and group is None and logits.dtype != torch.float16
        if eager:
            ts = token_scale.reshape(1)
            if opts.inplace_backward:
                grad = logits
                # The logits are overwritten now, not in backward: any other autograd node that saved
                # them fails with autograd's version-counter error instead of using the gradient.
                torch.autograd.graph.increment_version(logits)
            else:
                grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            partials = triton_ops().gem_forward_grad(logits, labels, ts.expand(logits.shape[0]), opts, grad)
            loss, extras, _ = finalize(partials, valid, opts, labels)
            ctx.grad = grad
            ctx.save_for_backward(labels, ts)
            return _outputs(ctx, loss, extras)
        partials = vocab_parallel.combined_partials(triton_ops().gem_forward, logits, labels, opts, group)
        loss, extras, stats = finalize(partials, valid, opts, labels)
        ctx.save_for_backward(logits, labels, stats)
        return _outputs(ctx, loss, extras)

    @staticmethod
    def backward(ctx, grad_loss, _grad_extras):
        opts: GEMOptions = ctx.opts
        if ctx.grad is not None:
            grad = take_once(
                ctx,
                "grad",
                "gem_loss(impl='triton') computes the gradient of a reduced loss in its "
                "forward and hands it to autograd without a copy, so it supports one backward per "
                "forward; run the forward again instead of retain_graph=True (or use reduction='none' "
                "and reduce yourself)",
            )
            labels, ts = ctx.saved_tensors
            if grad_loss is None:
                return (grad.zero_(),) + _NONE
            triton_ops().gem_scale_rows(grad, labels, grad_loss, ts, opts)
            return (grad,) + _NONE
        logits, labels, stats = ctx.saved_tensors
        grad_loss = _zeros_if_none(grad_loss, logits.shape[0], logits)
        out = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        return (grad_into(logits, labels, stats, grad_loss, opts, out),) + _NONE


class GEMTorchFunction(torch.autograd.Function):
    """PyTorch path over row blocks. On one device without in-place, the gradient is computed in the
    same pass as the loss (the row statistics are complete per row block) and backward only scales it;
    otherwise backward recomputes it block by block from the saved statistics."""

    @staticmethod
    def forward(ctx, logits, labels, opts: GEMOptions, group, grad_enabled: bool = True):
        # grad_enabled: the caller's grad mode (off inside this method): no gradient work under no_grad.
        valid = labels != opts.ignore_index
        # fp16 is excluded: its gradient must be scaled by the upstream gradient (e.g. GradScaler's
        # 2^16) before it is rounded to fp16, or small entries underflow; it is recomputed in backward.
        eager_grad = (
            grad_enabled
            and ctx.needs_input_grad[0]
            and not opts.inplace_backward
            and group is None
            and logits.dtype != torch.float16
        )
        if eager_grad:
            partials, grad = gem_forward_row_blocks(logits, labels, opts, compute_grad=True)
        else:
            partials = vocab_parallel.combined_partials(gem_partials, logits, labels, opts, group)
            grad = None
        loss, extras, stats = finalize(partials, valid, opts, labels)
        ctx.opts = opts
        ctx.grad = grad
        if grad is None:
            ctx.save_for_backward(logits, labels, stats)
        return _outputs(ctx, loss, extras)

    @staticmethod
    def backward(ctx, grad_loss, _grad_extras):
        opts: GEMOptions = ctx.opts
        if ctx.grad is not None:
            grad = take_once(
                ctx,
                "grad",
                "gem_loss(impl='torch') scales its precomputed gradient in place and "
                "supports one backward per forward; run the forward again instead of retain_graph=True",
            )
            if grad_loss is None:
                return (grad.zero_(),) + _NONE
            # In fp32 for bf16 gradients: a factor rounded to bf16 first would bias the whole gradient.
            if grad_loss.dim() == 1 and grad_loss.stride(0) == 0 and grad_loss.numel() > 0:
                scale_grads_((grad,), grad_loss[0])  # expanded scalar: no sync
            else:
                scale_rows_(grad, grad_loss)
            return (grad,) + _NONE
        logits, labels, stats = ctx.saved_tensors
        grad_loss = _zeros_if_none(grad_loss, logits.shape[0], logits)
        out = logits if opts.inplace_backward else None
        return (gem_grad_row_blocks(logits, labels, stats, grad_loss, opts, out=out),) + _NONE
