"""Reduction of per-token losses, shared by every functional entry point."""

from __future__ import annotations

import torch

from ..options import METRIC_NAMES, X_CE


def reduce_tokens(per_token: torch.Tensor, valid: torch.Tensor, reduction: str, num_items_in_batch, shape):
    """per_token [N] fp32 (0 at ignored tokens), valid [N] bool -> the reduced loss.

    "mean" divides by num_items_in_batch when given, else by the number of valid tokens (at least 1,
    so an all-ignored batch gives 0 with zero gradient, not NaN); "none" restores ``shape``.
    """
    if reduction == "none":
        return per_token.view(shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is None:
        return total / valid.sum().clamp(min=1).to(total.dtype)
    return total / items_denominator(num_items_in_batch, total)


def items_denominator(num_items_in_batch, like: torch.Tensor):
    """num_items_in_batch as a divisor, with 0 read as 1: a count of 0 means every token of the
    accumulation window is ignored, so the sum is 0 and the loss must be 0 with zero gradient
    (as for an all-ignored batch), not 0/0 = NaN."""
    if isinstance(num_items_in_batch, torch.Tensor):
        n = num_items_in_batch.to(device=like.device, dtype=like.dtype).reshape(())
        return torch.where(n == 0, torch.ones_like(n), n)
    return float(num_items_in_batch) or 1.0


def finish_outputs(loss, extras, valid, reduction, num_items_in_batch, shape, return_ce: bool, return_metrics: bool):
    """The public return value: ``loss``, ``(loss, ce)``, ``(loss, metrics)`` or ``(loss, ce, metrics)``.

    extras [N, E] are the Function's detached per-token extras (options.X_*), each reduced like the
    loss; metrics is a dict {"ce", "entropy", "token_accuracy"} of detached tensors.
    """
    if not return_ce and not return_metrics:
        return loss
    cols = [
        reduce_tokens(extras[:, k], valid, reduction, num_items_in_batch, shape).detach()
        for k in range(extras.shape[1])
    ]
    out = [loss]
    if return_ce:
        out.append(cols[X_CE])
    if return_metrics:
        out.append(dict(zip(METRIC_NAMES, cols)))
    return tuple(out)


def token_weight(reduction: str, valid: torch.Tensor, num_items_in_batch, dtype: torch.dtype = torch.float32):
    """d(reduced loss)/d(per-token loss) as a 0-d tensor of ``dtype`` (the per-token loss's: fp32,
    or fp64 for fp64 inputs) on the labels' device, or None for "none": 1 for "sum", 1 / n_valid
    (at least 1) or 1 / num_items_in_batch for "mean". No host synchronisation. It is computed with
    the very operation autograd applies in the backward of ``reduce_tokens`` (1 / denominator in the
    loss's dtype), so for an upstream gradient of exactly 1 the per-token upstream equals it bit for
    bit, which the gradient-in-forward paths check on the device before rescaling anything."""
    if reduction == "none":
        return None
    one = torch.ones((), dtype=dtype, device=valid.device)
    if reduction == "sum":
        return one
    if num_items_in_batch is None:
        return one / valid.sum().clamp(min=1).to(one.dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.detach()
    return one / items_denominator(num_items_in_batch, one)
