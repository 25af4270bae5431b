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
from ..torch_ops import finalize, gem_forward_chunked, gem_grad_chunked
from . import vocab_parallel
from ._scale import scale_grads_, scale_rows_


def _kernel_opts(opts: GEMOptions) -> dict:
    return dict(
        vocab_start=opts.vocab_start,
        ignore_index=opts.ignore_index,
        beta=float(opts.beta),
        logsigmoid=opts.logsigmoid,
        logit_scale=float(opts.logit_scale),
        softcap=float(opts.softcap) if opts.softcap is not None else 0.0,
    )


def triton_partials(logits, labels, opts: GEMOptions, label_logits=None):
    from ..ops import gem_forward

    return gem_forward(logits, labels, label_logits, need_lse=opts.need_lse, metrics=opts.return_metrics,
                       **_kernel_opts(opts))


def triton_grad(logits, labels, stats, grad_loss, opts: GEMOptions, out: torch.Tensor) -> torch.Tensor:
    from ..ops import gem_backward

    gem_backward(logits, labels, stats, grad_loss, out, z_loss_scale=float(opts.z_loss_scale), **_kernel_opts(opts))
    return out


def triton_partials_and_grad(logits, labels, row_scale, opts: GEMOptions, out: torch.Tensor) -> torch.Tensor:
    """partials [N, 6] of every row, and d(sum_i row_scale_i loss_i)/d logits written into ``out``
    (which may be ``logits``), by the gradient-in-forward kernel. row_scale [N] fp32 (0-stride for
    one scalar). Single device only: a vocabulary shard needs the combined partials first."""
    from ..ops import gem_forward_grad

    return gem_forward_grad(logits, labels, row_scale, out, need_lse=opts.need_lse,
                            z_loss_scale=float(opts.z_loss_scale), metrics=opts.return_metrics,
                            **_kernel_opts(opts))


def torch_partials(logits, labels, opts: GEMOptions, label_logits=None):
    return gem_forward_chunked(logits, labels, opts, label_logits=label_logits)[0]


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
    def forward(ctx, logits, labels, opts: GEMOptions, group, grad_enabled: bool = True, token_scale=None):
        valid = labels != opts.ignore_index
        ctx.opts = opts
        ctx.grad = None
        eager = (grad_enabled and ctx.needs_input_grad[0] and token_scale is not None and group is None
                 and logits.dtype != torch.float16)
        if eager:
            ts = token_scale.reshape(1)
            if opts.inplace_backward:
                grad = logits
                # The logits are overwritten now, not in backward: any other autograd node that saved
                # them fails with autograd's version-counter error instead of using the gradient.
                torch.autograd.graph.increment_version(logits)
            else:
                grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            partials = triton_partials_and_grad(logits, labels, ts.expand(logits.shape[0]), opts, out=grad)
            loss, extras, _ = finalize(partials, valid, opts, labels)
            ctx.grad = grad
            ctx.save_for_backward(labels, ts)
            return _outputs(ctx, loss, extras)
        partials = vocab_parallel.combined_partials(triton_partials, logits, labels, opts, group)
        loss, extras, stats = finalize(partials, valid, opts, labels)
        ctx.save_for_backward(logits, labels, stats)
        return _outputs(ctx, loss, extras)

    @staticmethod
    def backward(ctx, grad_loss, _grad_extras):
        opts: GEMOptions = ctx.opts
        if ctx.grad is not None:
            grad = ctx.grad
            if grad is _CONSUMED:
                raise RuntimeError(
                    "gem_loss(impl='triton') computes the gradient of a reduced loss in its forward and hands "
                    "it to autograd without a copy, so it supports one backward per forward; run the forward "
                    "again instead of retain_graph=True (or use reduction='none' and reduce yourself)")
            ctx.grad = _CONSUMED  # drop the reference: autograd may then keep the buffer as .grad
            labels, ts = ctx.saved_tensors
            if grad_loss is None:
                return grad.zero_(), None, None, None, None, None
            from ..ops import gem_scale_rows

            gem_scale_rows(grad, labels, grad_loss, ts, opts.ignore_index)
            return grad, None, None, None, None, None
        logits, labels, stats = ctx.saved_tensors
        grad_loss = _zeros_if_none(grad_loss, logits.shape[0], logits)
        out = logits if opts.inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
        return triton_grad(logits, labels, stats, grad_loss, opts, out), None, None, None, None, None


class GEMTorchFunction(torch.autograd.Function):
    """Chunked PyTorch path. On one device without in-place, the gradient is computed in the same
    chunked pass as the loss (the row statistics are complete per chunk) and backward only scales it;
    otherwise backward recomputes it chunk by chunk from the saved statistics."""

    @staticmethod
    def forward(ctx, logits, labels, opts: GEMOptions, group, grad_enabled: bool = True, token_scale=None):
        valid = labels != opts.ignore_index
        # fp16 is excluded: its gradient must be scaled by the upstream gradient (e.g. GradScaler's
        # 2^16) before it is rounded to fp16, or small entries underflow; it is recomputed in backward.
        eager_grad = (grad_enabled and ctx.needs_input_grad[0] and not opts.inplace_backward and group is None
                      and logits.dtype != torch.float16)
        if eager_grad:
            partials, grad = gem_forward_chunked(logits, labels, opts, compute_grad=True)
        else:
            partials = vocab_parallel.combined_partials(torch_partials, logits, labels, opts, group)
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
            grad = ctx.grad
            if grad is _CONSUMED:
                raise RuntimeError(
                    "gem_loss(impl='torch') scales its precomputed gradient in place and supports one "
                    "backward per forward; run the forward again instead of retain_graph=True"
                )
            ctx.grad = _CONSUMED
            if grad_loss is None:
                return grad.zero_(), None, None, None, None, None
            # In fp32 for bf16 gradients: a factor rounded to bf16 first would bias the whole gradient.
            if grad_loss.dim() == 1 and grad_loss.stride(0) == 0 and grad_loss.numel() > 0:
                scale_grads_((grad,), grad_loss[0])  # expanded scalar: no sync
            else:
                scale_rows_(grad, grad_loss)
            return grad, None, None, None, None, None
        logits, labels, stats = ctx.saved_tensors
        grad_loss = _zeros_if_none(grad_loss, logits.shape[0], logits)
        out = logits if opts.inplace_backward else None
        return gem_grad_chunked(logits, labels, stats, grad_loss, opts, out=out), None, None, None, None, None


_CONSUMED = object()
