"""GEMTrainer: ``transformers.Trainer`` training with GEM through :func:`apply_gem`'s fused path.

Import it from :mod:`gem_kernels.integrations.transformers`, which re-exports it;
``_GEMTrainerMixin`` is shared with the TRL trainer.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Trainer

from ._apply import counted_by_gem_trainer, gem_state, is_gem_applied, patch_model
from ._labels import batch_targets
from ._logits_path import GEMComputeLoss
from ._metrics import MetricWindow
from ._options import screen_options


class _GEMTrainerMixin:
    """Shared by GEMTrainer and GEMSFTTrainer: patch the model (fused path) or use a
    ``gem_compute_loss_func`` (logits path), count target tokens over the shifted labels, and log
    the plain CE, the entropy and the token accuracy beside GEM."""

    # num_items_in_batch is counted with the configured ignore_index (see _get_num_items_in_batch);
    # the patched forward and GEMComputeLoss refuse other ignore_index values from plain Trainers.
    _gem_counts_ignore_index = True

    def _gem_prepare(self, gem_options: Optional[dict], log_ce: bool, log_metrics: bool = True):
        """Before Trainer.__init__ (which may already call model_init): validate the options once
        into a GEMOptions and keep it (with the names given, for the logit transform)."""
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be a bool, got {log_metrics!r}")
        options = dict(gem_options or {})
        self._gem_user_options = bool(gem_options)
        if log_ce:
            options.setdefault("return_ce", True)
        if log_metrics:
            options.setdefault("return_metrics", True)
        self._gem_options = screen_options("fused", options)
        self._gem_given = frozenset(options)
        self._gem_log_ce = log_ce
        self._gem_log_metrics = log_metrics
        self._gem_logits_fn = None
        # accelerator is built later, by Trainer.__init__; the window sums over processes through it
        self._gem_window = MetricWindow(lambda rows: self.accelerator.reduce(rows, reduction="sum"))
        self._gem_ce_sum = None
        self._gem_ce_step = 0

    def _gem_setup(self):
        """After Trainer.__init__: refuse conflicting settings and patch the model (fused path), or
        adopt a gem_compute_loss_func (logits path)."""
        if getattr(self.args, "use_liger_kernel", False):
            raise ValueError(
                f"{type(self).__name__} does not support use_liger_kernel=True: Trainer applies Liger "
                f"when train() starts, after GEM, and Liger's fused cross-entropy replaces the model's "
                f"forward, so the steps would train CE. Drop use_liger_kernel (GEM already fuses the "
                f"LM head), or apply Liger's other kernels to the model yourself with "
                f"fused_linear_cross_entropy=False before building this trainer"
            )
        fn = getattr(self, "compute_loss_func", None)
        if fn is not None and not isinstance(fn, GEMComputeLoss):
            raise ValueError(
                f"{type(self).__name__} computes GEM itself; do not pass compute_loss_func (other "
                f"than gem_compute_loss_func(...), which selects the logits path)"
            )
        if fn is not None and self._gem_user_options:
            raise ValueError(
                f"{type(self).__name__}: with compute_loss_func=gem_compute_loss_func(...) give the "
                f"GEM options to gem_compute_loss_func, not gem_options"
            )
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support label_smoothing_factor")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one "
                f"process); launch with torchrun / accelerate launch instead"
            )
        # The loss shifts the labels, so Trainer must count the targets over labels[..., 1:] (or shift_labels).
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True
        if fn is not None:
            # Logits path: the model is not patched; the callable records its own window.
            fn.log_metrics = self._gem_log_metrics or self._gem_log_ce
            fn.attach_consumer()  # this trainer's log drains the callable's window
            self._gem_logits_fn = fn
            return
        if self.model is not None:
            self._gem_apply(self.model)
        # The patched forward takes num_items_in_batch.
        self.model_accepts_loss_kwargs = True

    def _gem_apply(self, model):
        return patch_model(model, self._gem_options, self._gem_given)

    def call_model_init(self, trial=None):
        # Trainer(model_init=...) builds a fresh model per train() call: patch each one.
        model = super().call_model_init(trial)
        return model if self._gem_logits_fn is not None else self._gem_apply(model)

    def _gem_ignore_index(self) -> int:
        fn = getattr(self, "_gem_logits_fn", None)
        return fn.ignore_index if fn is not None else self._gem_options.ignore_index

    def _get_num_items_in_batch(self, batch_samples, device):
        # Trainer counts targets as labels != -100; count those != ignore_index instead, through
        # Trainer's own code (shift, cross-device sum) on copies of the labels where ignored is -100.
        ignore_index = self._gem_ignore_index()
        if ignore_index != -100:
            batch_samples = [
                {
                    **b,
                    **{
                        k: torch.where(b[k] == ignore_index, -100, b[k])
                        for k in ("labels", "shift_labels")
                        if isinstance(b.get(k), torch.Tensor)
                    },
                }
                if isinstance(b, dict)
                else b
                for b in batch_samples
            ]
        return super()._get_num_items_in_batch(batch_samples, device)

    def _gem_extra_loss(self, loss, outputs, num_items_in_batch):
        """Terms added to the fused path's GEM loss after Trainer's scaling (GEMSFTTrainer: the MoE
        aux loss, by TRL's rule)."""
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer.compute_loss passes num_items_in_batch to the model and applies the
        # average_tokens_across_devices scaling; the CE gets the same scaling below.
        inputs = {**inputs, "use_cache": False}  # no KV cache while training or scoring
        targets = batch_targets(inputs, self._gem_options.ignore_index)
        # Guard (fused path): a training step with labels must take its loss from GEM's fused path.
        # The patched forward counts its fused calls; a forward replaced after apply_gem (Liger,
        # another integration) or removed would leave the count unchanged.
        fused = self._gem_logits_fn is None
        guard = fused and model.training and targets is not None
        state = gem_state(self.model)
        calls = None if state is None else state.fused_calls
        # This trainer counted num_items_in_batch with its ignore_index: it tells the patched forward
        # (fused path) or the callable (logits path, with the batch's shift_labels) directly.
        if fused:
            told = counted_by_gem_trainer(self.model)
        else:
            told = self._gem_logits_fn.gem_trainer_step(inputs)
        with told:
            loss, outputs = Trainer.compute_loss(
                self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if guard and (state is None or state.fused_calls == calls):
            raise RuntimeError(
                f"{type(self).__name__}: the loss of this training step did not come from GEM: the "
                f"model's forward ran without apply_gem's fused path (is_gem_applied: "
                f"{is_gem_applied(self.model)}). Something replaced or removed the forward that "
                f"apply_gem installed (e.g. Liger's fused cross-entropy or another kernel integration "
                f"applied after GEM, or remove_gem); refusing to train on another loss. Apply such "
                f"integrations before building the trainer, without their loss."
            )
        if fused:
            loss = self._gem_extra_loss(loss, outputs, num_items_in_batch)
        if self._gem_logits_fn is not None or not model.training:
            return (loss, outputs) if return_outputs else loss
        get = outputs.get if hasattr(outputs, "get") else (lambda name: None)
        ce = get("ce") if self._gem_log_ce else None
        if ce is not None:
            ce = ce.detach()
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                ce = ce * (self.accelerator.num_processes // tp)
            if self._gem_ce_sum is None:  # first micro-batch of a logging window (also after a resume)
                self._gem_ce_step = self.state.global_step
            self._gem_ce_sum = ce if self._gem_ce_sum is None else self._gem_ce_sum + ce
        if self._gem_log_metrics and get("entropy") is not None and targets is not None:
            metrics = {"entropy": get("entropy"), "token_accuracy": get("token_accuracy")}
            self._gem_window.add(metrics, (targets != self._gem_options.ignore_index).sum(), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._gem_logits_fn is not None:
            logs.update(self._gem_logits_fn.window_logs(self.args, self.state))
        elif "loss" in logs:
            if self._gem_ce_sum is not None:
                steps = max(self.state.global_step - self._gem_ce_step, 1)
                total = self.accelerator.gather(self._gem_ce_sum.reshape(1)).mean().item()
                logs["ce"] = total / steps
                self._gem_ce_sum = None
                self._gem_ce_step = self.state.global_step
            window = self._gem_window.pop()
            if window is not None:
                logs.update(window)
        return super().log(logs, *args, **kwargs)


class GEMTrainer(_GEMTrainerMixin, Trainer):
    """``transformers.Trainer`` training with GEM through the fused path (no logits in training).

    ``GEMTrainer(model=..., args=..., train_dataset=..., gem_options=dict(beta=0.7))`` takes every
    ``Trainer`` argument plus ``gem_options`` (options of :func:`apply_gem`), ``log_ce`` (default
    True: the plain CE, a by-product of the same pass, is logged as ``ce`` beside ``loss``) and
    ``log_metrics`` (default True: the entropy of the model's distribution and the token accuracy,
    from the same pass, are logged as ``entropy`` and ``mean_token_accuracy``, averaged over the
    logging window and the processes as TRL's SFTTrainer averages its own). Passing
    ``compute_loss_func=gem_compute_loss_func(...)`` instead of ``gem_options`` selects the logits
    path (the model is not patched), with the same logs.
    Gradient accumulation is exact: each micro-batch's summed loss is divided by Trainer's
    ``num_items_in_batch`` (target tokens of the whole accumulated batch, across devices with
    ``average_tokens_across_devices``). Evaluation computes GEM from the logits and returns them.
    """

    def __init__(
        self, *args, gem_options: Optional[dict] = None, log_ce: bool = True, log_metrics: bool = True, **kwargs
    ):
        self._gem_prepare(gem_options, log_ce, log_metrics)
        super().__init__(*args, **kwargs)
        self._gem_setup()
