"""GEM for TRL's SFTTrainer (TRL >= 1.0): ``GEMSFTTrainer``.

``SFTTrainer`` builds the labels from the dataset (``completion_mask`` with
``completion_only_loss``, ``assistant_masks`` with ``assistant_only_loss``: -100 wherever a token
is not trained on) and this trainer computes GEM on exactly those labels through the fused path
of :func:`gem_kernels.integrations.transformers.apply_gem`, so training never builds the logits.
"""
from __future__ import annotations

from typing import Optional

from trl import SFTTrainer

from ._trainer import _GEMTrainerMixin


class GEMSFTTrainer(_GEMTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training with GEM: ``GEMSFTTrainer(..., gem_options=dict(beta=0.7))``.

    Takes every ``SFTTrainer`` argument plus ``gem_options`` (options of ``apply_gem``: ``beta``,
    ``h``, ``z_loss_scale``, ``chunk_size``, ``impl``, ...), ``log_ce`` (default True: the plain
    CE is logged as ``ce`` beside the GEM ``loss``) and ``log_metrics`` (default True: SFTTrainer's
    ``entropy`` and ``mean_token_accuracy``, computed by GEM's own pass and averaged as SFTTrainer
    averages them). Gradient accumulation is exact (the summed loss of each micro-batch is divided
    by Trainer's ``num_items_in_batch``). ``num_tokens`` is logged as usual.
    ``compute_loss_func=gem_compute_loss_func(...)`` selects the logits path, with the same logs.
    """

    def __init__(self, *args, gem_options: Optional[dict] = None, log_ce: bool = True, log_metrics: bool = True,
                 **kwargs):
        self._gem_prepare(gem_options, log_ce, log_metrics)
        super().__init__(*args, **kwargs)
        self._gem_setup()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        if mode == "train":
            # Same token count SFTTrainer logs as num_tokens (attention_mask, or the packed length).
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = inputs["input_ids"].new_tensor(inputs["input_ids"].shape[-1])
            total = self.accelerator.gather_for_metrics(local.reshape(1)).sum().item()
            self._total_train_tokens += total // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


__all__ = ["GEMSFTTrainer"]
