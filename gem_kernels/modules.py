"""nn.Module wrappers of the functional API."""

from __future__ import annotations

import torch

from .functional import check_options, fused_linear_gem_loss_with_options, gem_loss_with_options
from .options import OPTION_DEFAULTS, OPTION_NAMES, GEMOptions

_SHARD_ARGUMENTS = ("process_group", "vocab_start")


def _split(cls_name: str, kind: str, options: dict):
    """(loss options, process_group, vocab_start): the last two are per-call arguments of the
    functional API that a module fixes at construction. An unknown name is refused here, naming the
    module and everything it accepts (num_items_in_batch is an argument of the call instead)."""
    allowed = OPTION_NAMES[kind] + _SHARD_ARGUMENTS
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        hint = (
            " (num_items_in_batch is passed to the call, not to the constructor)"
            if "num_items_in_batch" in unknown
            else ""
        )
        raise TypeError(f"{cls_name} got unknown option(s) {unknown}{hint}; allowed: {sorted(allowed)}")
    options = dict(options)
    return options, options.pop("process_group", None), options.pop("vocab_start", None)


def _repr(opts: GEMOptions, process_group, vocab_start) -> str:
    """The options that differ from their defaults, then the shard arguments when given."""
    items = [f"{k}={getattr(opts, k)!r}" for k, v in OPTION_DEFAULTS.items() if getattr(opts, k) != v]
    items += [
        f"{k}={v!r}" for k, v in (("process_group", process_group), ("vocab_start", vocab_start)) if v is not None
    ]
    return ", ".join(items)


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

    Attributes: ``options``, the :class:`gem_kernels.options.GEMOptions` built (and validated, once)
        at construction by ``gem_kernels.functional.check_options``; ``process_group``, ``vocab_start``.

    Raises: TypeError for an unknown option name, and gem_loss's ValueError / TypeError for a bad
        option value, both at construction; gem_loss's errors for bad tensors at the call.
    """

    def __init__(self, **options):
        super().__init__()
        options, self.process_group, self.vocab_start = _split("GEMLoss", "gem", options)
        self.options: GEMOptions = check_options("gem", **options)

    def forward(self, logits, labels, num_items_in_batch=None):
        return gem_loss_with_options(
            logits,
            labels,
            self.options,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
        )

    def extra_repr(self) -> str:
        return _repr(self.options, self.process_group, self.vocab_start)


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

    Attributes: ``options`` (the GEMOptions built and validated at construction), ``process_group``,
        ``vocab_start``.

    Raises: TypeError for an unknown option (including ``inplace_backward``) or a non-bool
        ``low_memory``, and ValueError /
        TypeError for a bad option value at construction; fused_linear_gem_loss's errors at the call.
    """

    def __init__(self, **options):
        super().__init__()
        options, self.process_group, self.vocab_start = _split("FusedLinearGEMLoss", "fused", options)
        self.options: GEMOptions = check_options("fused", **options)

    def forward(self, hidden, weight, labels, bias=None, num_items_in_batch=None):
        return fused_linear_gem_loss_with_options(
            hidden,
            weight,
            labels,
            bias,
            self.options,
            num_items_in_batch=num_items_in_batch,
            process_group=self.process_group,
            vocab_start=self.vocab_start,
        )

    def extra_repr(self) -> str:
        return _repr(self.options, self.process_group, self.vocab_start)
