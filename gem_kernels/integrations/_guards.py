"""Checks that keep the integrations from silently training something other than GEM.

* :func:`calling_trainer`: the ``transformers.Trainer`` whose method is on the call stack, if any.
  A plain Trainer hands neither the patched forward nor a ``compute_loss_func`` the facts they need
  (that it took the labels away, how it counted ``num_items_in_batch``, the batch's
  ``shift_labels``); the frames of its ``compute_loss`` hold them. Only looked up on the paths that
  need it, and not at all for what a GEM trainer tells directly (``_apply.counted_by_gem_trainer``,
  ``GEMComputeLoss.gem_trainer_step``): the walk serves the Trainers this package does not own.
* :func:`resolve_head`: the ``nn.Linear`` that the model's output embedding will call (PEFT's
  ``modules_to_save`` wrapper resolved to its active copy), or a clear error.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

_MAX_FRAMES = 48  # Trainer.compute_loss -> DDP / accelerate wrappers -> Module.__call__ -> forward: ~10-25


def calling_trainer(start: int = 2) -> tuple:
    """``(trainer, frame_locals)`` of the innermost frame on the stack that runs a method of a
    ``transformers.Trainer`` instance, or ``(None, None)``. Never imports transformers."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return None, None
    frame = sys._getframe(start)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        if "self" in frame.f_code.co_varnames[:1]:
            local = frame.f_locals
            if isinstance(local.get("self"), trainer_cls):
                return local["self"], local
        frame = frame.f_back
    return None, None


def trainer_batch(local) -> Optional[dict]:
    """The batch dict held by a Trainer / SFTTrainer ``compute_loss`` frame (its ``inputs``)."""
    inputs = None if local is None else local.get("inputs")
    return inputs if isinstance(inputs, dict) else None


def _full_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _modules_to_save_target(head):
    """PEFT ``ModulesToSaveWrapper``: the module its forward calls (same rule as peft 0.21: the first
    active adapter's trained copy, or the original module when adapters are disabled / none active)."""
    active = list(head.active_adapters) if not head.disable_adapters else []
    if active and active[0] in head.modules_to_save:
        return head.modules_to_save[active[0]]
    return head.original_module


def resolve_head(head, model_name: str) -> torch.nn.Linear:
    """The ``nn.Linear`` whose weight the fused path uses for the output embedding ``head``.

    Raises TypeError naming the full class when ``head`` is None or neither an ``nn.Linear`` nor a
    PEFT ``modules_to_save`` wrapper around one (a LoRA adapter or a quantised layer on the head:
    the fused path reads the weight directly and would bypass them)."""
    if head is None:
        raise TypeError(f"apply_gem: {model_name}.get_output_embeddings() returned None")
    inner = head
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        inner = _modules_to_save_target(head)
    # A LoRA layer keeps its own forward around a base_layer; a quantised Linear subclass holds integer
    # weights. FSDP2 / ZeRO-3 keep the Linear (FSDP2 subclasses it), with a floating weight.
    weight = getattr(inner, "weight", None)
    if (
        isinstance(inner, torch.nn.Linear)
        and not hasattr(inner, "base_layer")
        and isinstance(weight, torch.Tensor)
        and weight.dtype.is_floating_point
    ):
        return inner
    raise TypeError(
        f"apply_gem: the output embedding of {model_name} is a {_full_name(inner)}, not a plain "
        f"torch.nn.Linear. The fused path reads the head's weight directly, so an adapter (e.g. a PEFT "
        f"LoRA on lm_head) or a quantised head would be bypassed. Use gem_compute_loss_func(...) with "
        f"Trainer(compute_loss_func=...) (the logits path), or, with PEFT, train the head fully with "
        f"modules_to_save=['lm_head'] instead of a LoRA on it (the fused path supports that)."
    )


def refuse_if_trainer_took_labels(model):
    """A patched model called in training mode without labels: refuse when a Trainer took the labels
    away to compute another loss from the logits (label smoothing, a non-GEM compute_loss_func)."""
    trainer, _ = calling_trainer()
    if trainer is None:
        return
    fn = getattr(trainer, "compute_loss_func", None)
    if getattr(trainer, "label_smoother", None) is not None:
        what = f"its label-smoothed cross-entropy (label_smoothing_factor={trainer.args.label_smoothing_factor})"
    elif fn is not None and not getattr(fn, "computes_gem", False):
        what = f"the loss of its compute_loss_func ({fn!r})"
    else:
        return
    raise ValueError(
        f"apply_gem: {type(trainer).__name__} called the GEM-patched {type(model).__name__} without "
        f"labels in training, so the fused GEM loss cannot run and the step would train {what} instead. "
        f"GEM does not combine with label smoothing: set label_smoothing_factor=0 (GEMTrainer refuses it "
        f"up front), or drop compute_loss_func (or use gem_compute_loss_func without apply_gem)."
    )


def foreign_count_message(trainer, ignore_index: int, route: str) -> str:
    return (
        f"{route}: ignore_index={ignore_index}, but {type(trainer).__name__} counts the target tokens of a step "
        f"(num_items_in_batch) as labels != -100, so every step would be scaled by the wrong count. Label the "
        f"ignored positions -100 (the default ignore_index) in your collator, or use GEMTrainer, which counts "
        f"with gem_options['ignore_index']"
    )
