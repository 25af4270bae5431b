"""Option screening for the integrations: which loss options each way in takes, validated and
packed once into a :class:`~gem_kernels.options.GEMOptions` when it is configured (``apply_gem``,
``gem_compute_loss_func``, a GEM trainer's ``gem_options``), not at the first step, with the
functional layer's messages."""

from __future__ import annotations

from ..functional import check_options
from ..options import GEMOptions

# Options shared by gem_loss and fused_linear_gem_loss that a user may set once for a model.
COMMON_OPTIONS = (
    "beta",
    "h",
    "ignore_index",
    "logit_scale",
    "softcap",
    "z_loss_scale",
    "return_ce",
    "impl",
    "validate_labels",
    "return_metrics",
)
# What each way in takes, by the functional layer's kind: "fused" (apply_gem, GEMTrainer,
# GEMSFTTrainer) and "gem" (gem_compute_loss_func). reduction, process_group and vocab_start are
# the integrations' own business.
ALLOWED = {"fused": COMMON_OPTIONS + ("chunk_size", "low_memory"), "gem": COMMON_OPTIONS + ("inplace_backward",)}


def screen_options(kind: str, options: dict) -> GEMOptions:
    """``options`` (a dict of keyword options) validated and packed once by
    ``gem_kernels.functional.check_options(kind, ...)``; ``kind`` is "fused" or "gem".

    Raises TypeError for a name the integrations do not take for ``kind`` (the message lists the
    allowed ones), ValueError / TypeError for a bad value (the functional layer's messages)."""
    allowed = ALLOWED[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown GEM option(s) {unknown}; allowed: {sorted(allowed)}")
    return check_options(kind, **options)
