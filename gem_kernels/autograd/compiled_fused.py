"""torch.compile support for fused_linear_gem_loss: the fused path as opaque custom operators.

The design is that of :mod:`gem_kernels.autograd.compiled` (the torch path of gem_loss, and the
helpers both share): the chunk loop runs inside ``torch.library.custom_op`` operators the compiler
never traces; their fake implementations give the output shapes; ``register_autograd`` gives the
backward, which rescales gradients precomputed in the forward out of place or calls the backward
operator (``fused_backward_recompute``) for deferred ones.

This module has no ``from __future__ import annotations``: custom_op reads the annotations.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..chunk_policy import fused_chunk_rows
from ..options import NUM_STATS, GEMOptions
from .autocast import autocast_off
from .compiled import _HOST_READ, _compute_dtype, _extras_fake, _opt_args, _options, _scaled
from .fused_linear import fused_backward_recompute, fused_forward, valid_rows


@torch.library.custom_op("gem_kernels::fused_linear_gem_fwd", mutates_args=(), **_HOST_READ)
def _fused_fwd(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    token_scale: Optional[Tensor],
    beta: float,
    h: str,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    z_loss_scale: float,
    return_ce: bool,
    return_metrics: bool,
    impl: str,
    chunk_size: Optional[int],
    low_memory: bool,
    need_gx: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [N], extras [N, k] (options.X_*) or [0], stats [N, 5] (deferred gradients) or [0, 5],
    grad_hidden, grad_weight, grad_bias (precomputed for a reduced loss, each [0] when not computed))."""
    opts = _options(
        beta,
        h,
        ignore_index,
        logit_scale,
        softcap,
        z_loss_scale,
        return_ce,
        return_metrics,
        impl,
        chunk_size,
        low_memory,
    )
    # A compiled graph calls this operator under the caller's autocast state, whatever the
    # functional layer's autocast_off did while tracing: switch it off here too.
    with autocast_off(hidden2d.device.type):
        fwd = fused_forward(hidden2d, weight, bias, labels, opts, token_scale, None, need_gx, need_gw, need_gb)
    cdt = _compute_dtype(hidden2d.dtype)
    N = hidden2d.shape[0]
    if (need_gx or need_gw or need_gb) and not fwd.eager:
        # deferred: statistics of every row (zeros at ignored rows), so the shape is static
        stats = hidden2d.new_zeros(N, NUM_STATS, dtype=cdt)
        if fwd.stats_v is not None and fwd.rows is None:
            stats.copy_(fwd.stats_v)
        elif fwd.stats_v is not None:  # (None when no row is valid)
            stats.index_copy_(0, fwd.rows, fwd.stats_v.to(cdt))
    else:
        stats = hidden2d.new_empty(0, NUM_STATS, dtype=cdt)
    grads = fwd.grads if fwd.grads is not None else (None, None, None)
    grads = tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)
    return (fwd.loss, fwd.ce if fwd.ce is not None else fwd.loss.new_empty(0), stats) + grads


def _fused_eager(hidden2d, token_scale, need_gx, need_gw, need_gb) -> bool:
    """As fused_forward decides: gradients precomputed in the forward (see FusedLinearGEMFunction)."""
    return (need_gx or need_gw or need_gb) and token_scale is not None and hidden2d.dtype != torch.float16


@_fused_fwd.register_fake
def _(
    hidden2d,
    weight,
    bias,
    labels,
    token_scale,
    beta,
    h,
    ignore_index,
    logit_scale,
    softcap,
    z_loss_scale,
    return_ce,
    return_metrics,
    impl,
    chunk_size,
    low_memory,
    need_gx,
    need_gw,
    need_gb,
):
    N, H = hidden2d.shape
    V = weight.shape[0]
    cdt = _compute_dtype(hidden2d.dtype)
    eager = _fused_eager(hidden2d, token_scale, need_gx, need_gw, need_gb)
    deferred = (need_gx or need_gw or need_gb) and not eager
    new = hidden2d.new_empty
    return (
        new(N, dtype=cdt),
        _extras_fake(hidden2d, N, return_ce, return_metrics, cdt),
        new(N if deferred else 0, NUM_STATS, dtype=cdt),
        new((N, H) if eager and need_gx else (0,)),
        new((V, H) if eager and need_gw else (0,), dtype=weight.dtype),
        new((V,) if eager and need_gb and bias is not None else (0,), dtype=weight.dtype),
    )


@torch.library.custom_op("gem_kernels::fused_linear_gem_bwd", mutates_args=(), **_HOST_READ)
def _fused_bwd(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    stats: Tensor,
    grad_loss: Tensor,
    beta: float,
    h: str,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    z_loss_scale: float,
    return_ce: bool,
    return_metrics: bool,
    impl: str,
    chunk_size: Optional[int],
    low_memory: bool,
    need_gx: bool,
    need_gw: bool,
    need_gb: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Deferred gradients (reduction "none", fp16): (grad_hidden, grad_weight, grad_bias), [0] when not needed."""
    opts = _options(
        beta,
        h,
        ignore_index,
        logit_scale,
        softcap,
        z_loss_scale,
        return_ce,
        return_metrics,
        impl,
        chunk_size,
        low_memory,
    )
    rows, labels_v = valid_rows(labels, ignore_index)
    stats_v = stats if rows is None else stats.index_select(0, rows)
    chunk_rows = fused_chunk_rows(
        labels_v.shape[0],
        hidden2d.shape[1],
        weight.shape[0],
        device=hidden2d.device.type,
        itemsize=hidden2d.element_size(),
        low_memory=low_memory,
        chunk_size=chunk_size,
    )
    with autocast_off(hidden2d.device.type):
        grads = fused_backward_recompute(
            hidden2d,
            weight,
            bias,
            rows,
            labels_v,
            stats_v,
            grad_loss,
            opts,
            chunk_rows,
            (need_gx, need_gw, need_gb and bias is not None),
            None,
        )
    return tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)


@_fused_bwd.register_fake
def _(
    hidden2d,
    weight,
    bias,
    labels,
    stats,
    grad_loss,
    beta,
    h,
    ignore_index,
    logit_scale,
    softcap,
    z_loss_scale,
    return_ce,
    return_metrics,
    impl,
    chunk_size,
    low_memory,
    need_gx,
    need_gw,
    need_gb,
):
    new = hidden2d.new_empty
    return (
        new(hidden2d.shape if need_gx else (0,)),
        new(weight.shape if need_gw else (0,)),
        new((weight.shape[0],) if need_gb and bias is not None else (0,)),
    )


def _fused_setup(ctx, inputs, output):
    hidden2d, weight, bias, labels, token_scale, *rest = inputs
    need_gx, need_gw, need_gb = rest[-3:]
    need_gb = need_gb and bias is not None
    _, _, stats, gx, gw, gb = output
    ctx.rest, ctx.flags, ctx.has_bias = tuple(rest), (need_gx, need_gw, need_gb), bias is not None
    ctx.ignore_index = rest[2]
    ctx.eager = _fused_eager(hidden2d, token_scale, need_gx, need_gw, need_gb)
    if ctx.eager:
        ctx.save_for_backward(gx, gw, gb, labels, token_scale)
    else:
        ctx.save_for_backward(hidden2d, weight, bias, labels, stats)


def _upstream(grad_loss: Tensor, valid: Tensor) -> Tensor:
    """The single upstream value of a reduced loss (0-d), with no host read. The functional layer
    reduces right after the operator, so grad_loss is an expanded scalar; otherwise the first valid
    row's value, with a device-side check that every valid row agrees (never mis-scaled)."""
    if grad_loss.numel() == 0:
        return grad_loss.new_zeros(())
    if grad_loss.stride(0) == 0:
        return grad_loss[0]
    up = grad_loss[valid.to(torch.int8).argmax()]
    torch._assert_async(
        ((grad_loss == up) | ~valid).all(), "fused_linear_gem_loss: per-token upstream gradients need reduction='none'"
    )
    return up


def _fused_backward(ctx, grad_loss, _grad_ce, _grad_stats, _gx, _gw, _gb):
    need_gx, need_gw, need_gb = ctx.flags
    if ctx.eager:
        gx, gw, gb, labels, token_scale = ctx.saved_tensors
        up = _upstream(grad_loss, labels != ctx.ignore_index).to(torch.float64)
        factor = up / token_scale.to(torch.float64)
        grads = tuple(_scaled(g, factor) if need else None for g, need in ((gx, need_gx), (gw, need_gw), (gb, need_gb)))
    else:
        hidden2d, weight, bias, labels, stats = ctx.saved_tensors
        out = _fused_bwd(hidden2d, weight, bias, labels, stats, grad_loss, *ctx.rest)
        grads = tuple(g if need else None for g, need in zip(out, ctx.flags))
    return grads + (None,) * (2 + len(ctx.rest))


torch.library.register_autograd("gem_kernels::fused_linear_gem_fwd", _fused_backward, setup_context=_fused_setup)


def fused_linear_gem_compiled(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels1d: Tensor,
    opts: GEMOptions,
    token_scale,
    grad_enabled: bool,
):
    """(per-token loss [N], per-token extras [N, k] or empty), as FusedLinearGEMFunction, through the operators."""
    need_gx = grad_enabled and hidden2d.requires_grad
    need_gw = grad_enabled and weight.requires_grad
    need_gb = grad_enabled and bias is not None and bias.requires_grad
    if token_scale is not None and not isinstance(token_scale, Tensor):
        token_scale = torch.tensor(token_scale, dtype=torch.float64, device=hidden2d.device)
    loss, ce, *_ = _fused_fwd(
        hidden2d,
        weight,
        bias,
        labels1d,
        token_scale,
        *_opt_args(opts),
        opts.impl,
        opts.chunk_size,
        opts.low_memory,
        need_gx,
        need_gw,
        need_gb,
    )
    return loss, ce
