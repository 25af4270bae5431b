"""GEM for TRL's SFTTrainer (TRL >= 1.0): ``GEMSFTTrainer``.

``SFTTrainer`` builds the labels from the dataset (``completion_mask`` with
``completion_only_loss``, ``assistant_masks`` with ``assistant_only_loss``: -100 wherever a token
is not trained on) and this trainer computes GEM on exactly those labels through the fused path
of :func:`gem_kernels.integrations.transformers.apply_gem`, so training never builds the logits.
"""

from __future__ import annotations

from typing import Optional

from trl import SFTTrainer

from ._apply import gem_state
from ._trainer import _GEMTrainerMixin


class GEMSFTTrainer(_GEMTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training with GEM: ``GEMSFTTrainer(..., gem_options=dict(beta=0.7))``.

    Takes every ``SFTTrainer`` argument plus ``gem_options`` (options of ``apply_gem``: ``beta``,
    ``h``, ``z_loss_scale``, ``chunk_size``, ``low_memory``, ``impl``, ...), ``log_ce`` (default True: the plain
    CE is logged as ``ce`` beside the GEM ``loss``) and ``log_metrics`` (default True: SFTTrainer's
    ``entropy`` and ``mean_token_accuracy``, computed by GEM's own pass and averaged as SFTTrainer
    averages them). Gradient accumulation is exact (the summed loss of each micro-batch is divided
    by Trainer's ``num_items_in_batch``). ``num_tokens`` is logged as usual.
    ``compute_loss_func=gem_compute_loss_func(...)`` selects the logits path, with the same logs.
    """

    def __init__(
        self, *args, gem_options: Optional[dict] = None, log_ce: bool = True, log_metrics: bool = True, **kwargs
    ):
        if (gem_options or {}).get("ignore_index", -100) != -100:
            raise ValueError(
                "GEMSFTTrainer: SFTTrainer labels the positions without loss -100 (prompt, padding, "
                "masks), so gem_options['ignore_index'] must stay -100"
            )
        self._gem_prepare(gem_options, log_ce, log_metrics)
        super().__init__(*args, **kwargs)
        self._gem_setup()
        if self._gem_ignore_index() != -100:
            raise ValueError(
                "GEMSFTTrainer: SFTTrainer labels the positions without loss -100 (prompt, padding, "
                "masks), so the compute_loss_func's ignore_index must stay -100"
            )

    def _gem_apply(self, model):
        model = super()._gem_apply(model)
        # The MoE aux loss follows SFTTrainer's rule, added in _gem_extra_loss, not the model's.
        gem_state(model).aux_loss_in_forward = False
        return model

    def _gem_extra_loss(self, loss, outputs, num_items_in_batch):
        # SFTTrainer's rule (TRL 1.16): router_aux_loss_coef * aux_loss is a per-micro-batch mean added
        # after the cross-device scaling and, since Trainer leaves gradient accumulation to a loss
        # normalised by num_items_in_batch, divided by the accumulation steps. (On the logits path
        # SFTTrainer adds none, and neither does this trainer.)
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if not self.aux_loss_enabled or aux is None:
            return loss
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())
        return loss + self.router_aux_loss_coef * aux.to(loss.device) / steps

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
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


__all__ = ["GEMSFTTrainer"]
