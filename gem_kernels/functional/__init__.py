"""Functional API: argument validation, implementation choice and reduction.

``check_options`` validates a call's keyword options once and packs them into a ``GEMOptions``;
the ``*_with_options`` functions run a call with such options (what the modules and the trainer
integrations use). ``autocast_linear_inputs`` / ``autocast_off`` are the fused path's autocast
handling, for callers that run the lm_head themselves.
"""

from ..autograd import autocast_linear_inputs, autocast_off
from ._checks import check_num_items, check_options
from .fused_linear import fused_linear_gem_loss, fused_linear_gem_loss_with_options
from .gem import gem_loss, gem_loss_with_options

__all__ = [
    "autocast_linear_inputs",
    "autocast_off",
    "check_num_items",
    "check_options",
    "fused_linear_gem_loss",
    "fused_linear_gem_loss_with_options",
    "gem_loss",
    "gem_loss_with_options",
]
