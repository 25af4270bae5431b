"""GEM for Hugging Face transformers: a ``compute_loss_func``, a patched model forward and a Trainer.

Three ways in, from least to most memory-efficient:

* ``Trainer(..., compute_loss_func=gem_compute_loss_func(beta=0.7))``: the model computes its
  full logits ``[batch, seq, V]`` as usual and GEM is computed from them (the "logits path").
* ``apply_gem(model, beta=0.7)``: ``model(**batch, labels=labels)`` in training mode returns the
  GEM loss computed by :func:`gem_kernels.fused_linear_gem_loss` from the last hidden states and
  the LM-head weight, so no ``[batch, seq, V]`` tensor is ever built (the "fused path").
* ``GEMTrainer(..., gem_options=dict(beta=0.7))``: a ``Trainer`` that applies ``apply_gem`` to
  its model, keeps gradient accumulation exact and logs the plain CE beside GEM.

Labels follow the Hugging Face causal-LM convention: ``labels[b, t]`` is the token at position t
and the prediction made at position t is scored against ``labels[b, t + 1]``. The integrations do
the shift; a pre-shifted ``shift_labels`` (padding-free / context-parallel collators) is used as is.

This module is the public face: the code lives in private modules, each importing only those
below it (``_options``, ``_labels``, ``_logit_transforms``, ``_sharding``, ``_guards``,
``_metrics`` -> ``_head`` -> ``_apply`` -> ``_logits_path`` -> ``_trainer``).
"""

from __future__ import annotations

from ._apply import apply_gem, is_gem_applied, remove_gem
from ._labels import shift_causal_labels
from ._logit_transforms import logit_transform_from_config
from ._logits_path import GEMComputeLoss, gem_compute_loss_func
from ._trainer import GEMTrainer

__all__ = [
    "GEMComputeLoss",
    "GEMTrainer",
    "apply_gem",
    "gem_compute_loss_func",
    "is_gem_applied",
    "logit_transform_from_config",
    "remove_gem",
    "shift_causal_labels",
]
