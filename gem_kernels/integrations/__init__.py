"""Trainer integrations. Imported lazily: ``import gem_kernels`` never imports transformers or trl.

``gem_kernels.integrations.transformers``: ``gem_compute_loss_func``, ``apply_gem``, ``GEMTrainer``.
``gem_kernels.integrations.trl``: ``GEMSFTTrainer``.
"""

import importlib

_NAMES = {
    "GEMComputeLoss": "transformers",
    "GEMTrainer": "transformers",
    "apply_gem": "transformers",
    "gem_compute_loss_func": "transformers",
    "is_gem_applied": "transformers",
    "logit_transform_from_config": "transformers",
    "remove_gem": "transformers",
    "shift_causal_labels": "transformers",
    "GEMSFTTrainer": "trl",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
