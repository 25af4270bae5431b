"""What the fused path needs from sharded training frameworks (DeepSpeed ZeRO-3 here; FSDP2 and
DTensor heads are handled by ``_head.full_tensor``).

Under ZeRO-3 a parameter's data is an empty tensor except while a hooked module that uses it runs.
The fused loss reads the head's weight inside the head's own call (gathered by DeepSpeed's
pre-forward hook) and computes its gradient there; autograd accumulates that [V, H] gradient later,
in backward, which needs the weight's full shape again. ``apply_gem`` therefore routes the loss
through the head's output (``_head.intercept_head``), so DeepSpeed's pre-backward hook on
the head gathers the weight at the start of backward and its post-backward hook, on the head's
input, releases it as soon as the fused backward has returned: the shortest window DeepSpeed's
public hooks allow (an external parameter of the whole model would stay gathered all step).
"""

from __future__ import annotations


def is_zero3_param(p) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or a stage-3 engine)."""
    return p is not None and hasattr(p, "ds_id") and hasattr(p, "ds_shape")


def check_gathered(weight) -> None:
    """A ZeRO-3 head weight must be gathered (full ``ds_shape``) when the fused loss reads it."""
    if is_zero3_param(weight) and tuple(weight.shape) != tuple(weight.ds_shape):
        raise RuntimeError(
            f"apply_gem: the LM head's weight is partitioned by DeepSpeed ZeRO-3 (local shape "
            f"{tuple(weight.shape)}, full {tuple(weight.ds_shape)}) and nothing gathered it for the head's "
            f"call. Call the model through the engine that deepspeed.initialize (or Trainer) returned, "
            f"which installs the gathering hooks; a model built under deepspeed.zero.Init cannot run "
            f"before that. Otherwise set zero_optimization.stage to 2, or use gem_compute_loss_func"
        )
