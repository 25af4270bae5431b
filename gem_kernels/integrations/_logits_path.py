"""The logits path: ``GEMComputeLoss`` / ``gem_compute_loss_func``, GEM from the model's full logits
for ``Trainer(compute_loss_func=...)``, recording the training statistics for logging.

Import it from :mod:`gem_kernels.integrations.transformers`, which re-exports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..functional import gem_loss_with_options
from ._guards import calling_trainer, foreign_count_message, trainer_batch
from ._labels import aligned_targets
from ._metrics import MetricWindow, dist_sum
from ._options import screen_options


def _get_logits(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if outputs.get("logits") is None:
            raise ValueError(
                "compute_loss_func: the model outputs hold no 'logits' (was the model patched by "
                "apply_gem? then drop compute_loss_func: the model already returns the GEM loss)"
            )
        return outputs["logits"]
    return outputs[0]


class GEMComputeLoss(TrainerCallback):
    """``Trainer(compute_loss_func=...)`` callable: GEM from the model's full logits.

    Called by ``Trainer.compute_loss`` as ``fn(outputs, labels, num_items_in_batch=...)``. The
    logits ``[B, T, V]`` are taken from ``outputs``; ``labels [B, T]`` are shifted here (or
    ``shift_labels [B, T]`` is used as is). The summed per-token loss is divided by
    ``num_items_in_batch`` (Trainer's count of target tokens over the whole accumulated batch), so
    Trainer, which skips its own division by the accumulation steps whenever ``compute_loss_func``
    is set, gets exactly the loss of one big batch. Without ``num_items_in_batch`` it is the mean
    over this micro-batch's valid tokens.

    The model's own logit transforms (Gemma-2 softcapping, Cohere's logit_scale) are already
    applied to ``outputs.logits``, so none are applied again unless passed explicitly.

    Called from a ``Trainer``, a ``shift_labels`` in the batch is read from the calling
    ``compute_loss`` (Trainer does not pass it), and ``ignore_index`` other than -100 is refused
    (ValueError) unless the trainer is a GEM trainer: Trainer counts ``num_items_in_batch`` as
    ``labels != -100``.

    With ``log_metrics`` (default) and a consumer of the logs, every training call (grad enabled)
    also computes, in the same pass, the CE, the entropy and the token accuracy
    (``return_metrics``), keeps the last ones in ``.last_ce`` / ``.last_metrics`` and records them
    for logging. The consumers: ``GEMTrainer`` and ``GEMSFTTrainer`` given this callable as
    ``compute_loss_func``, and a plain ``Trainer`` given it as a callback too (``callbacks=[fn]``):
    it then adds ``ce``, ``entropy`` and ``mean_token_accuracy`` to each training log (see
    :mod:`gem_kernels.integrations._metrics`). With no consumer (a plain ``Trainer`` given it only
    as ``compute_loss_func``) nothing is recorded and the statistics are not computed (pass
    ``return_metrics=True`` to get ``.last_metrics`` anyway). The recorded state is O(1) per window.
    """

    def __init__(self, *, log_metrics: bool = True, **options):
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be a bool, got {log_metrics!r}")
        self.options = screen_options("gem", options)  # a GEMOptions, validated once
        self._given = dict(options)  # for repr
        self.ignore_index = self.options.ignore_index
        self.log_metrics = log_metrics
        self.last_ce: Optional[torch.Tensor] = None
        self.last_metrics: Optional[dict] = None
        self.window = MetricWindow(dist_sum)
        self._has_consumer = False  # set by attach_consumer: until then nothing would drain the window
        self._ce_sum = None
        self._ce_step = 0
        self._ce_is_local_mean = False
        self.computes_gem = True  # recognised by the guard against Trainers that take the labels away
        self._gem_trainer_batch = None  # the batch of the GEM trainer step under way (see gem_trainer_step)

    def __call__(self, outputs, labels, num_items_in_batch=None, shift_labels=None, **unused):
        # Trainer calls fn(outputs, labels, num_items_in_batch) without the batch's pre-shifted
        # shift_labels (padding-free / context-parallel collators). A GEM trainer hands the batch over
        # (gem_trainer_step); a plain Trainer's compute_loss frame holds it.
        batch = self._gem_trainer_batch
        if batch is None:
            trainer, frame = calling_trainer()
            if trainer is not None:
                batch = trainer_batch(frame)
                if (
                    self.ignore_index != -100
                    and num_items_in_batch is not None
                    and not getattr(trainer, "_gem_counts_ignore_index", False)
                ):
                    raise ValueError(foreign_count_message(trainer, self.ignore_index, "gem_compute_loss_func"))
        if shift_labels is None and batch is not None and batch.get("shift_labels") is not None:
            shift_labels = batch["shift_labels"]
        if labels is None and shift_labels is None:
            raise ValueError("GEM compute_loss_func needs labels; the batch has no 'labels'")
        logits = _get_logits(outputs)
        targets = aligned_targets(labels, shift_labels, self.ignore_index).to(logits.device)
        record = self.log_metrics and self._has_consumer and torch.is_grad_enabled()
        want_metrics = self.options.return_metrics or record
        options = (
            self.options
            if want_metrics == self.options.return_metrics
            else dataclasses.replace(self.options, return_metrics=want_metrics)
        )
        out = gem_loss_with_options(logits, targets, options, num_items_in_batch=num_items_in_batch)
        if not isinstance(out, tuple):
            return out
        loss = out[0]
        if self.options.return_ce:
            self.last_ce = out[1]
        if want_metrics:
            self.last_metrics = out[-1]
            if self.last_ce is None or not self.options.return_ce:
                self.last_ce = out[-1]["ce"]
            if record:
                self.window.add(out[-1], (targets != self.ignore_index).sum(), num_items_in_batch)
                self._ce_is_local_mean = num_items_in_batch is None
                self._ce_sum = self.last_ce if self._ce_sum is None else self._ce_sum + self.last_ce
        return loss

    @contextlib.contextmanager
    def gem_trainer_step(self, inputs: dict):
        """Used by GEMTrainer / GEMSFTTrainer around ``Trainer.compute_loss``: calls made meanwhile take
        the batch's ``shift_labels`` from ``inputs`` (Trainer does not pass them) and know that the
        trainer counted ``num_items_in_batch`` with ``ignore_index``, without looking for the Trainer
        on the call stack (which a plain Trainer needs)."""
        before, self._gem_trainer_batch = self._gem_trainer_batch, inputs
        try:
            yield
        finally:
            self._gem_trainer_batch = before

    def attach_consumer(self) -> None:
        """Start recording the statistics for logging: called by GEMTrainer / GEMSFTTrainer when they
        adopt this callable, and by the callback hooks when a Trainer has it in ``callbacks``."""
        self._has_consumer = True

    def on_init_end(self, args, state, control, **kwargs):
        self.attach_consumer()  # Trainer(..., callbacks=[fn])

    def on_train_begin(self, args, state, control, **kwargs):
        self.attach_consumer()  # trainer.add_callback(fn) after Trainer.__init__

    def pop_ce(self, steps: int, world: int, average_tokens: bool, sum_over_processes) -> Optional[float]:
        """Mean CE per optimizer step of the window, as GEMTrainer logs it (then reset)."""
        if self._ce_sum is None:
            return None
        total = sum_over_processes(self._ce_sum.detach().double().reshape(1))
        self._ce_sum = None
        # Each process's value is its share of the global token mean when Trainer counted the tokens
        # over all processes (average_tokens_across_devices), else its own mean: then average.
        per_process_mean = not average_tokens or self._ce_is_local_mean
        return float(total.item()) / (world if per_process_mean else 1) / max(steps, 1)

    def window_logs(self, args, state) -> dict:
        """The window's ``ce``, ``entropy`` and ``mean_token_accuracy`` (empty when nothing was
        recorded), then a fresh window. ``ce`` is the mean over the window's optimizer steps of
        each step's token-mean CE (as GEMTrainer logs it); entropy and accuracy follow TRL's rule
        (see :mod:`gem_kernels.integrations._metrics`)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        extra = self.window.pop(dist_sum) or {}
        ce = self.pop_ce(state.global_step - self._ce_step, world, bool(args.average_tokens_across_devices), dist_sum)
        self._ce_step = state.global_step
        if ce is not None:
            extra["ce"] = ce
        return extra

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Plain Trainer with callbacks=[fn]: add the window's statistics to the training log and to
        # the log_history entry Trainer appended for it just before calling the callbacks.
        if logs is None or "loss" not in logs or not self.log_metrics:
            return
        extra = self.window_logs(args, state)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def __repr__(self) -> str:
        return f"GEMComputeLoss({', '.join(f'{k}={v!r}' for k, v in self._given.items())})"


def gem_compute_loss_func(*, beta: float = 0.7, h: str = "linear", **options) -> GEMComputeLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer`` (and TRL trainers) computing GEM from the
    model's logits: ``Trainer(..., compute_loss_func=gem_compute_loss_func(beta=0.7))``.

    Options are those of :func:`gem_kernels.gem_loss` (``ignore_index``, ``z_loss_scale``,
    ``return_ce``, ``inplace_backward``, ``impl``, ...) plus ``log_metrics`` (default True: CE,
    entropy and token accuracy from the same pass, logged by GEMTrainer / GEMSFTTrainer, or by a
    plain Trainer given the callable as a callback too). The callable returns only the loss and
    keeps the detached CE in ``.last_ce`` and the statistics in ``.last_metrics``. This path builds the
    full ``[batch, seq, V]`` logits in the model; :func:`apply_gem` / :class:`GEMTrainer` do not.

    Args:
        beta: float > 0, temperature of q (default 0.7). h: "linear" or "logsigmoid".
        options: the other gem_loss keyword options (not ``num_items_in_batch``, ``reduction``,
            ``logit_scale`` / ``softcap`` unless the model does not apply them itself).
    Returns: a :class:`GEMComputeLoss`; called as ``fn(outputs, labels [B, T] integer,
        num_items_in_batch=None, shift_labels=None)`` it returns a float32 scalar loss.
    Raises: TypeError for an unknown option, ValueError / TypeError for a bad value (at once, not at
        the first step); at the call, ValueError when there are no labels or no logits, and, called
        from a plain Trainer, when ``ignore_index`` is not -100 (Trainer counts ``num_items_in_batch``
        as ``labels != -100``). Called from a Trainer, the batch's ``shift_labels`` are used.
    """
    return GEMComputeLoss(beta=beta, h=h, **options)
