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
and the prediction made at position t is scored against ``labels[b, t + 1]``. This module does the
shift; a pre-shifted ``shift_labels`` (padding-free / context-parallel collators) is used as is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..functional import gem_loss
from ..functional import check_options
from ._guards import (
    GEMForward, STATE_ATTR as _STATE_ATTR, calling_trainer, foreign_count_message, installed_forward,
    refuse_if_trainer_took_labels, resolve_head,
)
from ._logit_transforms import check_probe, logit_transform_from_config, probe_values
from ._sharding import check_gathered, is_zero3_param

# Options shared by gem_loss and fused_linear_gem_loss that a user may set once for a model.
_COMMON_OPTIONS = ("beta", "h", "ignore_index", "logit_scale", "softcap", "z_loss_scale", "return_ce", "impl",
                   "validate_labels", "return_metrics")
_FUSED_ONLY = ("chunk_size", "low_memory")
_LOGITS_ONLY = ("inplace_backward",)


def _check_gem_options(options: dict, allowed) -> dict:
    """Validate keyword options once, up front, with the same messages as gem_loss."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown GEM option(s) {unknown}; allowed: {sorted(allowed)}")
    check_options("gem", **{k: v for k, v in options.items() if k not in _FUSED_ONLY})
    check_options("fused", **{k: v for k, v in options.items() if k not in _LOGITS_ONLY})
    chunk = options.get("chunk_size")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk!r}")
    if not isinstance(options.get("low_memory", False), bool):
        raise TypeError(f"low_memory must be a bool, got {options['low_memory']!r}")
    return dict(options)


def shift_causal_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels [..., T] -> targets [..., T]`` with ``targets[..., t] = labels[..., t + 1]`` and
    ``ignore_index`` at the last position, so the targets line up with the logits / hidden states
    of every position without slicing (and copying) those.

    Args: ``labels`` an integer tensor [..., T] (T >= 1) on any device; ``ignore_index`` the int
    written at the last position (default -100). Returns a new tensor of the same shape, dtype and
    device; ``labels`` is not modified."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _aligned_targets(labels, shift_labels, ignore_index: int) -> torch.Tensor:
    if shift_labels is not None:
        return shift_labels
    return shift_causal_labels(labels, ignore_index)


def _zero3_tie(head_output: torch.Tensor, probe: bool) -> torch.Tensor:
    """The scalar added to the loss under ZeRO-3 so that backward passes the head's hooks: the sum of
    the head's (empty) output, or zero times the probe's sum. The probe's sum is made finite first
    (a large multiplier may overflow fp16 there, and inf * 0 is NaN); nan_to_num keeps the autograd
    edge to the head output, which is what fires DeepSpeed's hooks."""
    tie = head_output.sum()
    if not probe:
        return tie  # an empty sum: exactly 0
    return torch.nan_to_num(tie, nan=0.0, posinf=0.0, neginf=0.0) * 0


@contextlib.contextmanager
def _intercept_head(head: torch.nn.Module, compute, probe: bool = False):
    """While active, ``head(hidden)`` runs ``compute(head, hidden) -> (result, dtype)`` instead of
    the projection and returns an empty ``[..., 0]`` tensor in place of the logits, or with
    ``probe`` the ``[..., len(PROBE)]`` float32 probe of known raw values (see ``_logit_transforms``;
    float32 whatever the head's dtype, so the check resolves a transform to float32 precision),
    whose transformed values the model then returns as its logits.

    The head is still called through ``nn.Module.__call__``, so DeepSpeed ZeRO-3 / FSDP pre-forward
    hooks on it gather its weight before ``compute`` reads it, and whatever the model does to its
    logits afterwards (softcapping, scaling) runs on an empty (or tiny) tensor for free.

    DeepSpeed ZeRO-3 (a partitioned head weight): the empty output is a view of the loss (the probe
    is tied to the loss with a zero factor) and ``box["head_output"]`` keeps it as the head's hooks
    returned it; the caller adds its sum (times zero for the probe) to the loss, so backward passes
    the head's ZeRO-3 hooks, which gather the weight for autograd to accumulate its [V, H] gradient
    and release it right after (see ``_sharding``).
    """
    box = {}
    link = is_zero3_param(getattr(head, "weight", None))

    def forward(hidden, *args, **kwargs):
        if "result" in box:
            raise RuntimeError("apply_gem: the output embedding was called twice in one forward; this model "
                               "is not supported by the fused path (use gem_compute_loss_func instead)")
        box["result"], box["dtype"] = result, dtype = compute(head, hidden)
        output = probe_values(hidden.shape[:-1], torch.float32, hidden.device) if probe else None
        if link:
            loss = result[0] if isinstance(result, tuple) else result
            if output is None:
                return loss.to(hidden.dtype).reshape([1] * hidden.dim()).expand(*hidden.shape[:-1], 0)
            return output + loss.to(output.dtype).reshape([1] * hidden.dim()) * 0
        if output is not None:
            return output
        return hidden.new_empty(*hidden.shape[:-1], 0)

    def keep_output(module, args, output):
        box["head_output"] = output

    previous = head.__dict__.get("forward")
    head.forward = forward
    # Registered last, so it sees the output after DeepSpeed's own forward hooks wrapped it.
    handle = head.register_forward_hook(keep_output) if link else None
    try:
        yield box
    finally:
        if handle is not None:
            handle.remove()
        if previous is None:
            # not `del head.forward`: under torch.compile, dynamo replays a traced set + del of an
            # instance attribute as a bare del (AttributeError); popping the dict entry is equivalent
            head.__dict__.pop("forward", None)
        else:
            head.forward = previous


def _full(t):
    """A DTensor (FSDP2 / tensor parallel) as a regular tensor; gradients flow back to the shards."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


class _GEMState:
    """What apply_gem stores on a model: its original forward and the GEM options."""

    def __init__(self, original_forward, own_forward: bool, options: dict, logit_scale: float, softcap):
        self.original_forward = original_forward
        self.own_forward = own_forward  # True when forward was an instance attribute before patching
        self.options = options
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.transform_checked = False  # the first training step checks the logit transform (check_probe)
        self.fused_calls = 0  # training forwards whose loss came from the fused GEM path (the trainers' guard)
        self.aux_loss_in_forward = True  # GEMSFTTrainer adds the MoE aux loss itself, with TRL's rule

    def fused_options(self) -> dict:
        opts = {k: v for k, v in self.options.items() if k in _COMMON_OPTIONS + _FUSED_ONLY}
        opts.setdefault("logit_scale", self.logit_scale)
        opts.setdefault("softcap", self.softcap)
        return opts

    def logits_options(self) -> dict:
        # The model's forward already applied its own transforms to the logits it returns.
        return {k: v for k, v in self.options.items()
                if k in _COMMON_OPTIONS and k not in ("logit_scale", "softcap")}


_FIELD_CLASSES: dict = {}


@torch.compiler.assume_constant_result  # dynamo calls it while tracing instead of tracing class creation
def _with_fields(cls, names: tuple):
    """``cls`` (a ModelOutput dataclass) plus the fields ``names`` (``ce``, ``entropy``,
    ``token_accuracy``), created once per class and names. Real fields, not extra keys: DDP and
    torch.compile flatten outputs as pytrees and rebuild them with ``cls(**fields)``."""
    key = (cls, names)
    if key not in _FIELD_CLASSES:
        have = {f.name for f in dataclasses.fields(cls)}
        missing = [(n, Optional[torch.Tensor], None) for n in names if n not in have]
        suffix = "With" + "".join(n.title().replace("_", "") for n, _, _ in missing)
        _FIELD_CLASSES[key] = cls if not missing else dataclasses.make_dataclass(
            f"{cls.__name__}{suffix}", missing, bases=(cls,), namespace={"__module__": __name__})
    return _FIELD_CLASSES[key]


def _rebuild(out, loss, extras: dict, keep_logits: bool):
    """A copy of the model output with ``loss`` and the detached ``extras`` ({name: tensor}) set,
    ``logits`` dropped unless ``keep_logits``."""
    fields = {k: v for k, v in out.items() if k != "loss" and (keep_logits or k != "logits")}
    if not extras:
        return type(out)(loss=loss, **fields)
    return _with_fields(type(out), tuple(extras))(loss=loss, **extras, **fields)


def _add_aux_loss(model, out, loss):
    # MoE models add router_aux_loss_coef * aux_loss to their loss when labels are given; the
    # original forward ran without labels, so add it here the same way.
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    coef = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                   "router_aux_loss_coef", 0.0)
    if aux is not None and coef:
        loss = loss + coef * aux.to(loss.device)
    return loss


def _gem_forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
    """Replacement forward installed by :func:`apply_gem` (see there)."""
    state: _GEMState = getattr(self, _STATE_ATTR)
    if labels is None and shift_labels is None:
        if self.training and torch.is_grad_enabled():
            refuse_if_trainer_took_labels(self)
        return state.original_forward(*args, **kwargs)
    ignore_index = state.options.get("ignore_index", -100)
    if ignore_index != -100 and num_items_in_batch is not None:
        trainer, _ = calling_trainer()
        if trainer is not None and not getattr(trainer, "_gem_counts_ignore_index", False):
            raise ValueError(foreign_count_message(trainer, ignore_index, "apply_gem"))
    targets = _aligned_targets(labels, shift_labels, ignore_index)
    return_tuple = kwargs.pop("return_dict", None) is False
    return_ce = bool(state.options.get("return_ce", False))
    return_metrics = bool(state.options.get("return_metrics", False))

    if self.training:
        from .. import fused_linear_gem_loss  # written by the fused-kernel issue; imported late on purpose

        opts = state.fused_options()

        def compute(head, hidden):
            check_gathered(head.weight)
            weight, bias = _full(head.weight), _full(head.bias)
            if weight.device.type == "meta":
                raise RuntimeError("apply_gem: the LM head's weight is offloaded (meta device, e.g. accelerate "
                                   "cpu_offload / disk offload); the fused path cannot load it. Use "
                                   "gem_compute_loss_func (the logits path) for offloaded models")
            if hidden.device != weight.device:  # a device_map may put the head on another device
                hidden = hidden.to(weight.device)
            device = hidden.device.type
            if torch.is_autocast_enabled(device):
                # What autocast would do to lm_head(hidden); the kernel itself then runs without
                # autocast so its fp32 accumulations stay fp32.
                dtype = torch.get_autocast_dtype(device)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            elif hidden.dtype != weight.dtype:
                hidden = hidden.to(weight.dtype)
            with torch.autocast(device, enabled=False):
                return fused_linear_gem_loss(hidden, weight, targets.to(hidden.device), bias=bias,
                                             num_items_in_batch=num_items_in_batch, **opts), hidden.dtype

        head = resolve_head(self.get_output_embeddings(), type(self).__name__)
        probe = not state.transform_checked
        with _intercept_head(head, compute, probe=probe) as box:
            out = state.original_forward(*args, return_dict=True, **kwargs)
        if "result" not in box:
            raise RuntimeError(f"apply_gem: {type(self).__name__}'s forward never called its output embedding")
        if probe:  # once: the model's own post-head transform must be the one the fused path applied
            state.transform_checked = check_probe(out.get("logits"), opts["logit_scale"],
                                                  opts["softcap"], type(self).__name__)
        result = box["result"]
        loss = result[0] if isinstance(result, tuple) else result
        extras = {}
        if return_ce:
            extras["ce"] = result[1]
        if return_metrics:
            extras.update(result[-1])  # ce (the same value), entropy, token_accuracy
        if "head_output" in box:  # ZeRO-3: backward must pass the head's hooks (see _intercept_head)
            loss = loss + _zero3_tie(box["head_output"], probe).to(loss.dtype)
        state.fused_calls += 1
        keep_logits = False
    else:
        # Evaluation with labels: the logits are wanted anyway, so GEM is computed from them.
        out = state.original_forward(*args, return_dict=True, **kwargs)
        opts = state.logits_options()
        # scalar statistics among the outputs would be gathered as predictions
        opts.pop("return_ce", None)
        opts.pop("return_metrics", None)
        loss = gem_loss(out.logits, targets.to(out.logits.device), num_items_in_batch=num_items_in_batch, **opts)
        extras, keep_logits = {}, True
    if state.aux_loss_in_forward:
        loss = _add_aux_loss(self, out, loss)
    out = _rebuild(out, loss, extras, keep_logits)
    return out.to_tuple() if return_tuple else out


def _target_model(model):
    # A PEFT model forwards to its base model's forward, which is the one to patch.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_gem(model, *, beta: float = 0.7, h: str = "linear", **options):
    """Make ``model(**batch, labels=labels)`` return the GEM loss without building the logits.

    Works on any Hugging Face causal LM whose forward projects the final hidden states with
    ``model.get_output_embeddings()`` (an ``nn.Linear``). The instance's ``forward`` is replaced:

    * labels (or ``shift_labels``) given and ``model.training``: the model's own forward runs with
      its output embedding intercepted; at the head call, ``fused_linear_gem_loss(hidden [B, T, H],
      lm_head.weight [V, H], shifted labels [B, T], bias=lm_head.bias)`` computes the loss, and the
      output holds ``loss`` (float32 scalar: summed loss / ``num_items_in_batch``, or the mean over
      target tokens), ``ce`` when ``return_ce=True``, ``ce``, ``entropy`` and ``token_accuracy``
      (reduced like the loss) when ``return_metrics=True``, and no ``logits``.
    * labels given, eval mode: the original forward builds the logits, the loss is GEM on them,
      and the output keeps its ``logits``.
    * no labels (generation, plain inference): the original forward, untouched.

    The config's logit transforms (``final_logit_softcapping``, ``logits_soft_cap``,
    ``output_logit_soft_cap``, ``logit_scale``, ``logits_scaling``, ...) are honoured (see
    :func:`logit_transform_from_config`, which refuses unknown ones); explicit ``logit_scale`` /
    ``softcap`` options win. The first training call checks them against the model's own forward
    (a probe through the head) and raises ValueError when they differ.
    Calling it again replaces the options. The patched model pickles, ``torch.save``-s and
    deep-copies as patched.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel``, or a PEFT model wrapping one) whose output
            embedding is a plain ``nn.Linear`` [V, H] (float32 / bfloat16 / float16, any device), or
            PEFT's ``modules_to_save`` copy of one.
        beta: float > 0 (default 0.7). h: "linear" or "logsigmoid" (the authors trained with
            "logsigmoid", beta 0.7).
        options: ``ignore_index`` (int), ``logit_scale`` (float > 0) / ``softcap`` (float > 0) to
            override the config, ``z_loss_scale`` (float >= 0), ``return_ce`` (bool), ``return_metrics``
            (bool: ce, entropy and token_accuracy from the same pass), ``chunk_size``
            (None or int >= 1), ``validate_labels`` (bool, default True: the label range check; False
            skips it, see gem_loss), ``low_memory`` (bool: fused_linear_gem_loss's low-memory mode),
            ``impl`` ("auto" / "triton" / "torch" / "reference").
    Returns: ``model`` (patched in place).
    Raises:
        TypeError: an unknown option; an output embedding that is not a plain ``nn.Linear`` (a LoRA
            or a quantised head: the message names its class and what to use instead).
        ValueError: a bad option value, an encoder-decoder model, or a config ``logits_scaling`` /
            other logit-transform key whose meaning for this model type is unknown (pass
            ``logit_scale`` / ``softcap``). At the first training forward: a logit transform the
            fused path does not reproduce; errors of the head (offloaded to meta, a DeepSpeed ZeRO-3
            weight that no hook gathered: RuntimeError). Called from a ``transformers.Trainer``:
            ValueError when Trainer took the labels away (label smoothing, a non-GEM
            ``compute_loss_func``) or counted ``num_items_in_batch`` with -100 while ``ignore_index``
            is another value.

    Sharded training: FSDP2 and DeepSpeed ZeRO-1/2/3 need no extra step (under ZeRO-3 the loss is
    routed through the head's output so DeepSpeed gathers the weight for the head's backward; see
    ``_sharding`` and docs/integrations.md).
    """
    options = _check_gem_options({"beta": beta, "h": h, **options}, _COMMON_OPTIONS + _FUSED_ONLY)
    target = _target_model(model)
    previous: Optional[_GEMState] = getattr(target, _STATE_ATTR, None)
    if previous is not None:
        original, own = previous.original_forward, previous.own_forward
    else:
        original, own = target.forward, "forward" in target.__dict__
    # explicit values win (see _GEMState); the config is only read for what was not given
    scale, softcap = logit_transform_from_config(target.config, logit_scale_given="logit_scale" in options,
                                                 softcap_given="softcap" in options)
    if getattr(target.config, "is_encoder_decoder", False):
        raise ValueError("apply_gem supports causal LMs (labels shifted by one inside the model); "
                         f"{type(target).__name__} is an encoder-decoder model")
    head = target.get_output_embeddings()
    if head is not None:  # refuse an adapter / quantised head now rather than at the first step
        resolve_head(head, type(target).__name__)
    state = _GEMState(original, own, options, scale, softcap)
    if previous is not None:
        state.aux_loss_in_forward = previous.aux_loss_in_forward
    setattr(target, _STATE_ATTR, state)
    target.forward = GEMForward(target)
    # Trainer passes num_items_in_batch to forward only when the model says it accepts loss kwargs.
    target.accepts_loss_kwargs = True
    return model


def remove_gem(model):
    """Undo :func:`apply_gem`: restore the model's original forward. Returns the model. A forward that
    something else installed after apply_gem is left in place.

    Args:
        model: the model (or PEFT wrapper) given to apply_gem; a model that was never patched is
            returned unchanged (no error).
    """
    target = _target_model(model)
    state = getattr(target, _STATE_ATTR, None)
    if state is not None:
        if installed_forward(target) is not None:
            if state.own_forward:
                target.forward = state.original_forward
            else:
                del target.forward  # back to the class's forward
        delattr(target, _STATE_ATTR)
        target.__dict__.pop("accepts_loss_kwargs", None)
    return model


def is_gem_applied(model) -> bool:
    """True when a training call of ``model`` with labels runs apply_gem's GEM forward: the patch
    state is there and the forward apply_gem installed is still the one called (False after
    :func:`remove_gem`, and after e.g. Liger's fused cross-entropy replaced the forward).

    Args:
        model: any object (a model or PEFT wrapper); never raises.
    """
    target = _target_model(model)
    return getattr(target, _STATE_ATTR, None) is not None and installed_forward(target) is not None


# The logits path and the Trainer subclass live in their own modules; they are part of this module's API.
from ._logits_path import GEMComputeLoss, gem_compute_loss_func  # noqa: E402
from ._trainer import GEMTrainer  # noqa: E402

__all__ = ["GEMComputeLoss", "GEMTrainer", "apply_gem", "gem_compute_loss_func", "is_gem_applied",
           "logit_transform_from_config", "remove_gem", "shift_causal_labels"]
