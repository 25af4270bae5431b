"""The fused path at the output embedding: the loss computed inside the head's own call.

:func:`fused_head_loss` builds what runs there (``fused_linear_gem_loss`` on the hidden states and
the head's weight); :func:`intercept_head` makes the head run it instead of the projection. The
model's forward runs unchanged around it (see ``_apply``).
"""

from __future__ import annotations

import contextlib

import torch

from ..functional import autocast_linear_inputs, autocast_off, fused_linear_gem_loss_with_options
from ..options import GEMOptions
from ._logit_transforms import probe_values
from ._sharding import check_gathered, is_zero3_param


def full_tensor(t):
    """A DTensor (FSDP2 / tensor parallel) as a regular tensor; gradients flow back to the shards."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def fused_head_loss(targets: torch.Tensor, num_items_in_batch, options: GEMOptions):
    """``compute(head, hidden) -> result`` for :func:`intercept_head`: what ``fused_linear_gem_loss``
    returns for ``hidden [..., H]``, the head's weight [V, H] and bias, the ``targets [...]`` and
    ``options`` (validated by ``check_options("fused")``)."""

    def compute(head, hidden):
        check_gathered(head.weight)
        weight, bias = full_tensor(head.weight), full_tensor(head.bias)
        if weight.device.type == "meta":
            raise RuntimeError(
                "apply_gem: the LM head's weight is offloaded (meta device, e.g. accelerate "
                "cpu_offload / disk offload); the fused path cannot load it. Use "
                "gem_compute_loss_func (the logits path) for offloaded models"
            )
        if hidden.device != weight.device:  # a device_map may put the head on another device
            hidden = hidden.to(weight.device)
        # What autocast does to lm_head(hidden), by the functional layer's rule; the loss itself then
        # runs with autocast off, so its fp32 accumulations stay fp32.
        hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
        if hidden.dtype != weight.dtype:  # the head's own matmul would need hidden in its dtype
            hidden = hidden.to(weight.dtype)
        with autocast_off(hidden.device.type):
            return fused_linear_gem_loss_with_options(
                hidden, weight, targets.to(hidden.device), bias, options, num_items_in_batch=num_items_in_batch
            )

    return compute


def zero3_tie(head_output: torch.Tensor, probe: bool) -> torch.Tensor:
    """The scalar added to the loss under ZeRO-3 so that backward passes the head's hooks: the sum of
    the head's (empty) output, or zero times the probe's sum. The probe's sum is made finite first
    (a large multiplier may overflow fp16 there, and inf * 0 is NaN); nan_to_num keeps the autograd
    edge to the head output, which is what fires DeepSpeed's hooks."""
    tie = head_output.sum()
    if not probe:
        return tie  # an empty sum: exactly 0
    return torch.nan_to_num(tie, nan=0.0, posinf=0.0, neginf=0.0) * 0


@contextlib.contextmanager
def intercept_head(head: torch.nn.Module, compute, probe: bool = False):
    """While active, ``head(hidden)`` runs ``compute(head, hidden) -> result`` instead of
    the projection and returns an empty ``[..., 0]`` tensor in place of the logits, or with
    ``probe`` the ``[..., len(PROBE)]`` float32 probe of known raw values (see ``_logit_transforms``;
    float32 whatever the head's dtype, so the check resolves a transform to float32 precision),
    whose transformed values the model then returns as its logits.

    The head is still called through ``nn.Module.__call__``, so DeepSpeed ZeRO-3 / FSDP pre-forward
    hooks on it gather its weight before ``compute`` reads it, and whatever the model does to its
    logits afterwards (softcapping, scaling) runs on an empty (or tiny) tensor for free.

    DeepSpeed ZeRO-3 (a partitioned head weight): the empty output is a view of the loss (the probe
    is tied to the loss with a zero factor) and ``box["head_output"]`` keeps it as the head's hooks
    returned it; the caller adds its sum (times zero for the probe) to the loss, so backward passes
    the head's ZeRO-3 hooks, which gather the weight for autograd to accumulate its [V, H] gradient
    and release it right after (see ``_sharding``).
    """
    box = {}
    link = is_zero3_param(getattr(head, "weight", None))

    def forward(hidden, *args, **kwargs):
        if "result" in box:
            raise RuntimeError(
                "apply_gem: the output embedding was called twice in one forward; this model "
                "is not supported by the fused path (use gem_compute_loss_func instead)"
            )
        box["result"] = result = compute(head, hidden)
        output = probe_values(hidden.shape[:-1], torch.float32, hidden.device) if probe else None
        if link:
            loss = result[0] if isinstance(result, tuple) else result
            if output is None:
                return loss.to(hidden.dtype).reshape([1] * hidden.dim()).expand(*hidden.shape[:-1], 0)
            return output + loss.to(output.dtype).reshape([1] * hidden.dim()) * 0
        if output is not None:
            return output
        return hidden.new_empty(*hidden.shape[:-1], 0)

    def keep_output(module, args, output):
        box["head_output"] = output

    previous = head.__dict__.get("forward")
    head.forward = forward
    # Registered last, so it sees the output after DeepSpeed's own forward hooks wrapped it.
    handle = head.register_forward_hook(keep_output) if link else None
    try:
        yield box
    finally:
        if handle is not None:
            handle.remove()
        if previous is None:
            # not `del head.forward`: under torch.compile, dynamo replays a traced set + del of an
            # instance attribute as a bare del (AttributeError); popping the dict entry is equivalent
            head.__dict__.pop("forward", None)
        else:
            head.forward = previous
