"""Option screening for the integrations: which loss options each way in takes, checked once, when
it is configured (``apply_gem``, ``gem_compute_loss_func``, a GEM trainer's ``gem_options``), not at
the first step, with the functional layer's messages."""
from __future__ import annotations

from ..functional import check_options

# Options shared by gem_loss and fused_linear_gem_loss that a user may set once for a model.
COMMON_OPTIONS = ("beta", "h", "ignore_index", "logit_scale", "softcap", "z_loss_scale", "return_ce", "impl",
                  "validate_labels", "return_metrics")
FUSED_OPTIONS = COMMON_OPTIONS + ("chunk_size", "low_memory")  # apply_gem, GEMTrainer, GEMSFTTrainer
LOGITS_OPTIONS = COMMON_OPTIONS + ("inplace_backward",)  # gem_compute_loss_func


def screen_options(options: dict, allowed) -> dict:
    """Validate keyword options once, up front, with the same messages as gem_loss; returns a copy.

    Raises TypeError for a name not in ``allowed``, ValueError / TypeError for a bad value."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown GEM option(s) {unknown}; allowed: {sorted(allowed)}")
    check_options("fused" if "chunk_size" in allowed else "gem", **options)
    return dict(options)
