"""torch.compile support: the torch path of gem_loss and the fused path as opaque custom operators
(the fused path's operators are in ``compiled_fused.py``; the helpers both use are here).

Under torch.compile the functional layer calls :func:`gem_torch_compiled` and
:func:`fused_linear_gem_compiled` instead of the eager autograd Functions, so that

* the chunk loops, whose trip counts and row gathers depend on tensor values (valid tokens), run
  inside an operator the compiler never traces (``torch.library.custom_op``);
* each operator's fake implementation gives its output shapes, which depend on input shapes only;
* the backward (``register_autograd``) is traced by AOTAutograd: gradients precomputed in the
  forward are rescaled out of place, deferred ones call the backward operator.

The operators run the same bodies as the eager Functions (``gem_forward_row_blocks`` /
``gem_grad_row_blocks``, ``fused_forward`` / ``fused_backward_recompute``). Differences from eager,
about memory, never values: the rescaling allocates a new gradient instead of scaling in place,
and ``inplace_backward`` is not applied (the gradient gets its own buffer). Vocabulary-parallel calls
(``process_group``)
keep the eager Functions. The Triton logits path needs no operator here: its kernels are
``torch.library.triton_op`` and are traced as they are (CUDA only: the interpreter cannot be traced).

This module has no ``from __future__ import annotations``: custom_op reads the annotations.
"""

import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..options import NUM_STATS, GEMOptions
from ..torch_ops import finalize, gem_forward_row_blocks, gem_grad_row_blocks

# The forward operators read the valid-token count on the host (to skip ignored rows), which a CUDA
# graph cannot capture: tagged, inductor's graph partitioning (mode="reduce-overhead") runs them
# outside the captured graphs. (The tag exists from torch 2.8 on; older versions get no tag.)
_HOST_READ = (
    {"tags": (torch.Tag.cudagraph_unsafe,)}
    if hasattr(torch.Tag, "cudagraph_unsafe") and "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _opt_args(opts: GEMOptions) -> tuple:
    """GEMOptions as the operators' scalar arguments (single device: vocab_start 0, no in-place)."""
    return (
        opts.beta,
        opts.h,
        opts.ignore_index,
        opts.logit_scale,
        opts.softcap,
        opts.z_loss_scale,
        opts.return_ce,
        opts.return_metrics,
    )


def _options(
    beta,
    h,
    ignore_index,
    logit_scale,
    softcap,
    z_loss_scale,
    return_ce,
    return_metrics,
    impl="torch",
    chunk_size=None,
    low_memory=False,
) -> GEMOptions:
    """The GEMOptions of ``_opt_args`` (+ the fused path's impl, chunk_size and low_memory), rebuilt
    inside an operator: the operators' schemas take scalars, not dataclasses. Only fields that the
    computation reads cross; the rest (reduction, validate_labels) was used above the operator."""
    return GEMOptions(
        beta=beta,
        h=h,
        ignore_index=ignore_index,
        logit_scale=logit_scale,
        softcap=softcap,
        z_loss_scale=z_loss_scale,
        return_ce=return_ce,
        return_metrics=return_metrics,
        impl=impl,
        chunk_size=chunk_size,
        low_memory=low_memory,
    )


def _extras_fake(like: Tensor, n: int, return_ce: bool, return_metrics: bool, dtype) -> Tensor:
    """The per-token extras' shape (options.X_*): [n, 3] with return_metrics, [n, 1] with return_ce, else [0]."""
    k = GEMOptions(return_ce=return_ce, return_metrics=return_metrics).num_extras
    return like.new_empty((n, k) if k else (0,), dtype=dtype)


def _scaled(g: Tensor, factor: Tensor) -> Tensor:
    """g * factor computed in fp32 (fp64 for fp64 g) and rounded once to g's dtype: the same
    arithmetic as the eager in-place rescaling (``scale_grads_``), out of place."""
    cdt = _compute_dtype(g.dtype)
    return (g.to(cdt) * factor.to(cdt)).to(g.dtype)


# ------------------------------------------------------------------------------------------------
# gem_loss, impl="torch"


@torch.library.custom_op("gem_kernels::gem_torch_fwd", mutates_args=(), **_HOST_READ)
def _gem_torch_fwd(
    logits: Tensor,
    labels: Tensor,
    beta: float,
    h: str,
    ignore_index: int,
    logit_scale: float,
    softcap: Optional[float],
    z_loss_scale: float,
    return_ce: bool,
    return_metrics: bool,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (loss [N], extras [N, k] (options.X_*) or [0], stats [N, 5], gradient of each row's loss
    [N, V] or [0])."""
    opts = _options(beta, h, ignore_index, logit_scale, softcap, z_loss_scale, return_ce, return_metrics)
    partials, grad = gem_forward_row_blocks(logits, labels, opts, compute_grad=compute_grad)
    loss, ce, stats = finalize(partials, labels != ignore_index, opts, labels)
    return (loss, ce if ce is not None else loss.new_empty(0), stats, grad if grad is not None else logits.new_empty(0))


@_gem_torch_fwd.register_fake
def _(
    logits, labels, beta, h, ignore_index, logit_scale, softcap, z_loss_scale, return_ce, return_metrics, compute_grad
):
    N = logits.shape[0]
    cdt = _compute_dtype(logits.dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    return (
        logits.new_empty(N, dtype=cdt),
        _extras_fake(logits, N, return_ce, return_metrics, cdt),
        logits.new_empty(N, NUM_STATS, dtype=cdt),
        grad,
    )


@torch.library.custom_op("gem_kernels::gem_torch_bwd", mutates_args=())
def _gem_torch_bwd(
    logits: Tensor,
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
) -> Tensor:
    """d(sum_i grad_loss_i loss_i)/d logits from the saved row statistics."""
    opts = _options(beta, h, ignore_index, logit_scale, softcap, z_loss_scale, return_ce, return_metrics)
    return gem_grad_row_blocks(logits, labels, stats, grad_loss, opts)


@_gem_torch_bwd.register_fake
def _(
    logits,
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
):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _gem_torch_setup(ctx, inputs, output):
    logits, labels, *opt, compute_grad = inputs
    _, _, stats, grad = output
    ctx.opt, ctx.compute_grad = tuple(opt), compute_grad
    if compute_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, labels, stats)


def _gem_torch_backward(ctx, grad_loss, _grad_ce, _grad_stats, _grad_grad):
    if ctx.compute_grad:
        (grad,) = ctx.saved_tensors
        g = _scaled(grad, grad_loss[:, None])
    else:
        logits, labels, stats = ctx.saved_tensors
        g = _gem_torch_bwd(logits, labels, stats, grad_loss, *ctx.opt)
    return (g,) + (None,) * 10


torch.library.register_autograd("gem_kernels::gem_torch_fwd", _gem_torch_backward, setup_context=_gem_torch_setup)


def gem_torch_compiled(logits2d: Tensor, labels1d: Tensor, opts: GEMOptions, grad_enabled: bool):
    """(per-token loss [N], per-token extras [N, k] or empty), as GEMTorchFunction, through the operators.
    As there, fp16 logits get their gradient in backward (scaled before it is rounded)."""
    compute_grad = grad_enabled and logits2d.requires_grad and logits2d.dtype != torch.float16
    loss, ce, _, _ = _gem_torch_fwd(logits2d, labels1d, *_opt_args(opts), compute_grad)
    return loss, ce
