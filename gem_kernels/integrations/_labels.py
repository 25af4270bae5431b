"""The causal shift of Hugging Face labels: ``labels[b, t]`` is the token at position t, and the
prediction made at position t is scored against ``labels[b, t + 1]``. A pre-shifted
``shift_labels`` (padding-free / context-parallel collators) is used as is."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def shift_causal_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels [..., T] -> targets [..., T]`` with ``targets[..., t] = labels[..., t + 1]`` and
    ``ignore_index`` at the last position, so the targets line up with the logits / hidden states
    of every position without slicing (and copying) those.

    Args: ``labels`` an integer tensor [..., T] (T >= 1) on any device; ``ignore_index`` the int
    written at the last position (default -100). Returns a new tensor of the same shape, dtype and
    device; ``labels`` is not modified."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def aligned_targets(
    labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor], ignore_index: int
) -> torch.Tensor:
    """The targets of every position: ``shift_labels`` when given, else ``labels`` shifted by one."""
    if shift_labels is not None:
        return shift_labels
    return shift_causal_labels(labels, ignore_index)


def batch_targets(inputs: dict, ignore_index: int) -> Optional[torch.Tensor]:
    """The shifted targets of a batch (``shift_labels``, or ``labels`` shifted by one), or None."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    if inputs.get("labels") is not None:
        return shift_causal_labels(inputs["labels"], ignore_index)
    return None
