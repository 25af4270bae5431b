"""GEMTrainer: ``transformers.Trainer`` training with GEM through :func:`apply_gem`'s fused path.

Import it from :mod:`gem_kernels.integrations.transformers`, which re-exports it;
``_GEMTrainerMixin`` is shared with the TRL trainer. That module imports this one at its end, so
the names used from it are imported where they are called.
"""
from __future__ import annotations

from typing import Optional

from transformers import Trainer


class _GEMTrainerMixin:
    """Shared by GEMTrainer and GEMSFTTrainer: patch the model, count target tokens over the shifted
    labels, and log the plain CE beside GEM."""

    def _gem_prepare(self, gem_options: Optional[dict], log_ce: bool):
        """Before Trainer.__init__ (which may already call model_init): validate and keep the options."""
        from .transformers import _COMMON_OPTIONS, _FUSED_ONLY, _check_gem_options

        options = dict(gem_options or {})
        if log_ce:
            options.setdefault("return_ce", True)
        _check_gem_options({"beta": 0.7, "h": "linear", **options}, _COMMON_OPTIONS + _FUSED_ONLY)
        self._gem_options = options
        self._gem_ce_sum = None
        self._gem_ce_step = 0

    def _gem_setup(self):
        """After Trainer.__init__: refuse conflicting settings and patch the model."""
        from .transformers import apply_gem

        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(f"{type(self).__name__} computes GEM itself; do not pass compute_loss_func")
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support label_smoothing_factor")
        if self.args.n_gpu > 1:
            raise ValueError(f"{type(self).__name__} does not support nn.DataParallel (several GPUs in one "
                             f"process); launch with torchrun / accelerate launch instead")
        if self.model is not None:
            apply_gem(self.model, **self._gem_options)
        # The patched forward takes num_items_in_batch, and the loss shifts the labels, so Trainer
        # must count the targets over labels[..., 1:] (or shift_labels).
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True

    def call_model_init(self, trial=None):
        # Trainer(model_init=...) builds a fresh model per train() call: patch each one.
        from .transformers import apply_gem

        return apply_gem(super().call_model_init(trial), **self._gem_options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer.compute_loss passes num_items_in_batch to the model and applies the
        # average_tokens_across_devices scaling; the CE gets the same scaling below.
        inputs = {**inputs, "use_cache": False}  # no KV cache while training or scoring
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        ce = outputs.get("ce") if hasattr(outputs, "get") else None
        if ce is not None and model.training:
            ce = ce.detach()
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                ce = ce * (self.accelerator.num_processes // tp)
            if self._gem_ce_sum is None:  # first micro-batch of a logging window (also after a resume)
                self._gem_ce_step = self.state.global_step
            self._gem_ce_sum = ce if self._gem_ce_sum is None else self._gem_ce_sum + ce
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if self._gem_ce_sum is not None and "loss" in logs:
            steps = max(self.state.global_step - self._gem_ce_step, 1)
            total = self.accelerator.gather(self._gem_ce_sum.reshape(1)).mean().item()
            logs["ce"] = total / steps
            self._gem_ce_sum = None
            self._gem_ce_step = self.state.global_step
        return super().log(logs, *args, **kwargs)


class GEMTrainer(_GEMTrainerMixin, Trainer):
    """``transformers.Trainer`` training with GEM through the fused path (no logits in training).

    ``GEMTrainer(model=..., args=..., train_dataset=..., gem_options=dict(beta=0.7))`` takes every
    ``Trainer`` argument plus ``gem_options`` (options of :func:`apply_gem`) and ``log_ce`` (default
    True: the plain CE, a by-product of the same pass, is logged as ``ce`` beside ``loss``).
    Gradient accumulation is exact: each micro-batch's summed loss is divided by Trainer's
    ``num_items_in_batch`` (target tokens of the whole accumulated batch, across devices with
    ``average_tokens_across_devices``). Evaluation computes GEM from the logits and returns them.
    """

    def __init__(self, *args, gem_options: Optional[dict] = None, log_ce: bool = True, **kwargs):
        self._gem_prepare(gem_options, log_ce)
        super().__init__(*args, **kwargs)
        self._gem_setup()
