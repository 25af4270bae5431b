"""nn.Module wrappers of the functional API."""
from __future__ import annotations

import torch

from .functional import gem_loss
from .functional._checks import check_options


class GEMLoss(torch.nn.Module):
    """Module form of :func:`gem_kernels.gem_loss`; keyword options are fixed at construction.

    ``GEMLoss(beta=0.7)(logits [..., V], labels [...], num_items_in_batch=None)``.

    Args (construction, keyword only): every option of gem_loss except ``num_items_in_batch``, with
        its meaning, type and default: ``beta`` (float > 0, 0.7), ``h`` ("linear" / "logsigmoid"),
        ``ignore_index`` (int, -100), ``reduction`` ("mean" / "sum" / "none"), ``logit_scale``
        (float > 0, 1.0), ``softcap`` (None or float > 0), ``z_loss_scale`` (float >= 0, 0.0),
        ``return_ce`` (bool), ``return_metrics`` (bool), ``inplace_backward`` (bool), ``process_group`` /
        ``vocab_start`` (vocabulary-parallel shard), ``validate_labels`` (bool, True: the label range check; see
        gem_loss for the risk of False), ``impl`` ("auto" / "triton" / "torch" / "reference").
    Args (call): ``logits`` [..., V] float32 / bfloat16 / float16; ``labels`` [...] integer, same
        leading shape and device; ``num_items_in_batch`` (None, an int / float >= 0 or a one-element
        tensor; "mean" only) as in gem_loss.

    Returns: what gem_loss returns (float32 loss; ``(loss, ce)`` with ``return_ce``, ``(loss, metrics)``
        with ``return_metrics``, ``(loss, ce, metrics)`` with both).

    Raises: TypeError for an unknown option name, and gem_loss's ValueError / TypeError for a bad
        option value, both at construction; gem_loss's errors for bad tensors at the call.
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

    Args (construction, keyword only): every option of fused_linear_gem_loss except
        ``num_items_in_batch``: ``beta`` (float > 0, 0.7), ``h``, ``ignore_index``, ``reduction``,
        ``logit_scale``, ``softcap``, ``z_loss_scale``, ``return_ce``, ``return_metrics``,
        ``process_group`` / ``vocab_start``, ``chunk_size`` (None or int >= 1, valid tokens per chunk),
        ``validate_labels`` (bool, True), ``low_memory`` (bool, default False: d weight per
        vocabulary slice, no weight-sized buffer), ``impl``;
        meanings and defaults as in gem_loss. There is no ``inplace_backward`` (no logits exist).
    Args (call): ``hidden`` [..., H] float32 / bfloat16 / float16; ``weight`` [V, H] and optional
        ``bias`` [V] with hidden's dtype and device; ``labels`` [...] integer with hidden's leading
        shape; ``num_items_in_batch`` as in gem_loss.

    Returns: what fused_linear_gem_loss returns (float32 loss, ``(loss, ce)``, ``(loss, metrics)`` or
        ``(loss, ce, metrics)``).

    Raises: TypeError for an unknown option (including ``inplace_backward``) or a non-bool
        ``low_memory``, and ValueError /
        TypeError for a bad option value at construction; fused_linear_gem_loss's errors at the call.
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
        for name in ("process_group", "vocab_start", "num_items_in_batch", "chunk_size", "low_memory"):
            merged.pop(name)
        if not isinstance(options.get("low_memory", False), bool):
            raise TypeError(f"low_memory must be a bool, got {options['low_memory']!r}")
        check_options(num_items_in_batch=None, **merged)
        self.options = dict(options)

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        from .functional import fused_linear_gem_loss

        return fused_linear_gem_loss(hidden, weight, labels, bias, num_items_in_batch=num_items_in_batch,
                                     **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
