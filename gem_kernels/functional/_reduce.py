"""Reduction of per-token losses, shared by every functional entry point."""
from __future__ import annotations

import torch


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
    if isinstance(num_items_in_batch, torch.Tensor):
        return total / num_items_in_batch.to(device=total.device, dtype=total.dtype).reshape(())
    return total / float(num_items_in_batch)
