"""nn.Module wrappers of the functional API."""
from __future__ import annotations

import torch

from .functional import gem_loss
from .functional._checks import check_options


class GEMLoss(torch.nn.Module):
    """Module form of :func:`gem_kernels.gem_loss`; keyword options are fixed at construction.

    ``GEMLoss(beta=0.7)(logits [..., V], labels [...], num_items_in_batch=None)``.
    """

    def __init__(self, **options):
        super().__init__()
        allowed = set(gem_loss.__kwdefaults__) - {"num_items_in_batch"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"GEMLoss got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        merged = {**gem_loss.__kwdefaults__, **options}
        merged.pop("process_group")
        merged.pop("vocab_start")
        merged.pop("num_items_in_batch")
        check_options(num_items_in_batch=None, **merged)
        self.options = dict(options)

    def forward(self, logits, labels, num_items_in_batch=None):
        return gem_loss(logits, labels, num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearGEMLoss(torch.nn.Module):
    """Module form of :func:`gem_kernels.fused_linear_gem_loss`; keyword options are fixed at
    construction. The lm_head weight is passed per call (it belongs to the model, not the loss).

    ``FusedLinearGEMLoss(beta=0.7)(hidden [..., H], weight [V, H], labels [...], bias=None,
    num_items_in_batch=None)``.
    """

    def __init__(self, **options):
        super().__init__()
        from .functional import fused_linear_gem_loss

        defaults = fused_linear_gem_loss.__kwdefaults__
        allowed = set(defaults) - {"num_items_in_batch"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"FusedLinearGEMLoss got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        merged = {**defaults, **options}
        for name in ("process_group", "vocab_start", "num_items_in_batch", "chunk_size"):
            merged.pop(name)
        check_options(num_items_in_batch=None, **merged)
        self.options = dict(options)

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        from .functional import fused_linear_gem_loss

        return fused_linear_gem_loss(hidden, weight, labels, bias, num_items_in_batch=num_items_in_batch,
                                     **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
