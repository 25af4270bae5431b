"""``apply_gem`` / ``remove_gem`` / ``is_gem_applied``: the patched model forward and its state.

Import them from :mod:`gem_kernels.integrations.transformers`, which re-exports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Optional

import torch

from ..functional import check_options, gem_loss_with_options
from ..options import OPTION_NAMES, GEMOptions
from ._guards import calling_trainer, foreign_count_message, refuse_if_trainer_took_labels, resolve_head
from ._head import fused_head_loss, intercept_head, zero3_tie
from ._labels import aligned_targets
from ._logit_transforms import check_probe, logit_transform_from_config
from ._options import screen_options

# Attribute under which apply_gem keeps its state on the patched model.
STATE_ATTR = "_gem_kernels_state"


class GEMState:
    """What apply_gem stores on a model: its original forward and the options of its two paths, both
    derived from the one validated GEMOptions."""

    def __init__(self, original_forward, own_forward: bool, fused_options: GEMOptions, logits_options: GEMOptions):
        self.original_forward = original_forward
        self.own_forward = own_forward  # True when forward was an instance attribute before patching
        self.fused_options = fused_options  # training: fused_linear_gem_loss, with the model's logit transform
        self.logits_options = logits_options  # evaluation: gem_loss on the logits the model returns
        self.transform_checked = False  # the first training step checks the logit transform (check_probe)
        self.fused_calls = 0  # training forwards whose loss came from the fused GEM path (the trainers' guard)
        self.aux_loss_in_forward = True  # GEMSFTTrainer adds the MoE aux loss itself, with TRL's rule
        # Set by a GEM trainer while its compute_loss runs: it counted num_items_in_batch with ignore_index.
        self.counted_by_gem_trainer = False


def target_model(model):
    """The model whose forward apply_gem patches: a PEFT model's base model, else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def gem_state(model) -> Optional[GEMState]:
    """apply_gem's state on ``model`` (or on the base model of a PEFT wrapper), or None."""
    return getattr(target_model(model), STATE_ATTR, None)


@contextlib.contextmanager
def counted_by_gem_trainer(model):
    """While active, the patched forward of ``model`` (if any) knows that the calling GEM trainer
    counted ``num_items_in_batch`` with the configured ``ignore_index``, so it need not look for a
    plain Trainer on the call stack."""
    state = gem_state(model)
    if state is None:
        yield
        return
    before, state.counted_by_gem_trainer = state.counted_by_gem_trainer, True
    try:
        yield
    finally:
        state.counted_by_gem_trainer = before


class GEMForward:
    """The forward apply_gem installs on a model instance: a picklable callable (a plain module-level
    class holding the model), so pickle / torch.save / deepcopy / spawn carry the patch with the
    model. (A bound method would be pickled as a lookup of its name and come back unpatched.)"""

    def __init__(self, model):
        self._gem_target = model
        original = getattr(model, STATE_ATTR).original_forward
        func = getattr(original, "__func__", original)
        self.__name__ = getattr(func, "__name__", "forward")
        self.__qualname__ = getattr(func, "__qualname__", "forward")
        self.__doc__ = getattr(func, "__doc__", None)

    def __call__(self, *args, **kwargs):
        if args and args[0] is self._gem_target:  # bound again by a wrapper (accelerate's unwrap_model)
            args = args[1:]
        return gem_forward(self._gem_target, *args, **kwargs)

    @property
    def __wrapped__(self):
        original = getattr(self._gem_target, STATE_ATTR).original_forward
        return getattr(original, "__func__", original)

    @property
    def __signature__(self):
        # The original forward's (bound) signature: generate() and Trainer inspect it.
        return inspect.signature(getattr(self._gem_target, STATE_ATTR).original_forward)


def installed_forward(target) -> Optional[GEMForward]:
    """apply_gem's forward if calling ``target.forward`` reaches it (directly, or through wrappers that
    keep ``__wrapped__`` / ``__func__``, e.g. accelerate's autocast), else None."""
    f = target.__dict__.get("forward")
    for _ in range(32):
        if f is None:
            return None
        if isinstance(f, GEMForward):
            return f if f._gem_target is target else None
        f = getattr(f, "__func__", None) or getattr(f, "__wrapped__", None)
    return None


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
        _FIELD_CLASSES[key] = (
            cls
            if not missing
            else dataclasses.make_dataclass(
                f"{cls.__name__}{suffix}", missing, bases=(cls,), namespace={"__module__": __name__}
            )
        )
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
    coef = getattr(
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
        "router_aux_loss_coef",
        0.0,
    )
    if aux is not None and coef:
        loss = loss + coef * aux.to(loss.device)
    return loss


def gem_forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
    """Replacement forward installed by :func:`apply_gem` (see there)."""
    state: GEMState = getattr(self, STATE_ATTR)
    if labels is None and shift_labels is None:
        if self.training and torch.is_grad_enabled():
            refuse_if_trainer_took_labels(self)
        return state.original_forward(*args, **kwargs)
    fused = state.fused_options
    ignore_index = fused.ignore_index
    if ignore_index != -100 and num_items_in_batch is not None and not state.counted_by_gem_trainer:
        trainer, _ = calling_trainer()
        if trainer is not None and not getattr(trainer, "_gem_counts_ignore_index", False):
            raise ValueError(foreign_count_message(trainer, ignore_index, "apply_gem"))
    targets = aligned_targets(labels, shift_labels, ignore_index)
    return_tuple = kwargs.pop("return_dict", None) is False

    if self.training:
        head = resolve_head(self.get_output_embeddings(), type(self).__name__)
        probe = not state.transform_checked
        with intercept_head(head, fused_head_loss(targets, num_items_in_batch, fused), probe=probe) as box:
            out = state.original_forward(*args, return_dict=True, **kwargs)
        if "result" not in box:
            raise RuntimeError(f"apply_gem: {type(self).__name__}'s forward never called its output embedding")
        if probe:  # once: the model's own post-head transform must be the one the fused path applied
            state.transform_checked = check_probe(
                out.get("logits"), fused.logit_scale, fused.softcap, type(self).__name__
            )
        result = box["result"]
        loss = result[0] if isinstance(result, tuple) else result
        extras = {}
        if fused.return_ce:
            extras["ce"] = result[1]
        if fused.return_metrics:
            extras.update(result[-1])  # ce (the same value), entropy, token_accuracy
        if "head_output" in box:  # ZeRO-3: backward must pass the head's hooks (see intercept_head)
            loss = loss + zero3_tie(box["head_output"], probe).to(loss.dtype)
        state.fused_calls += 1
        keep_logits = False
    else:
        # Evaluation with labels: the logits are wanted anyway, so GEM is computed from them.
        out = state.original_forward(*args, return_dict=True, **kwargs)
        loss = gem_loss_with_options(
            out.logits, targets.to(out.logits.device), state.logits_options, num_items_in_batch=num_items_in_batch
        )
        extras, keep_logits = {}, True
    if state.aux_loss_in_forward:
        loss = _add_aux_loss(self, out, loss)
    out = _rebuild(out, loss, extras, keep_logits)
    return out.to_tuple() if return_tuple else out


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
    return patch_model(model, screen_options("fused", {"beta": beta, "h": h, **options}), frozenset(options))


def _check_config_transform(fused: GEMOptions, model_name: str) -> GEMOptions:
    """The logit_scale / softcap read from the model's config pass the same checks as the user's
    options (a NaN, infinite or non-positive value would otherwise reach the kernels unnamed)."""
    try:
        return check_options("fused", **{name: getattr(fused, name) for name in OPTION_NAMES["fused"]})
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"apply_gem: {model_name}'s config gives a logit transform the loss cannot apply ({err}); "
            f"fix the config or pass logit_scale=... / softcap=... explicitly"
        ) from err


def patch_model(model, options: GEMOptions, given: frozenset):
    """:func:`apply_gem` with its options already validated into ``options`` (``check_options("fused")``);
    ``given``: the names the caller set explicitly (an explicit ``logit_scale`` / ``softcap`` wins
    over the config's). Returns ``model``, patched."""
    target = target_model(model)
    previous: Optional[GEMState] = getattr(target, STATE_ATTR, None)
    if previous is not None:
        original, own = previous.original_forward, previous.own_forward
    else:
        original, own = target.forward, "forward" in target.__dict__
    # explicit values win; the config is only read for what was not given
    scale_given, softcap_given = "logit_scale" in given, "softcap" in given
    scale, softcap = logit_transform_from_config(
        target.config, logit_scale_given=scale_given, softcap_given=softcap_given
    )
    if getattr(target.config, "is_encoder_decoder", False):
        raise ValueError(
            "apply_gem supports causal LMs (labels shifted by one inside the model); "
            f"{type(target).__name__} is an encoder-decoder model"
        )
    head = target.get_output_embeddings()
    if head is not None:  # refuse an adapter / quantised head now rather than at the first step
        resolve_head(head, type(target).__name__)
    # Training (fused): the head's output never reaches the model's own transform, so the loss applies it.
    fused = dataclasses.replace(
        options,
        logit_scale=options.logit_scale if scale_given else scale,
        softcap=options.softcap if softcap_given else softcap,
    )
    if not (scale_given and softcap_given):
        fused = _check_config_transform(fused, type(target).__name__)
    # Evaluation (logits): the model's forward already applied its transform to the logits it returns,
    # and scalar statistics among the outputs would be gathered as predictions.
    logits = dataclasses.replace(
        options, logit_scale=1.0, softcap=None, return_ce=False, return_metrics=False, chunk_size=None, low_memory=False
    )
    state = GEMState(original, own, fused, logits)
    if previous is not None:
        state.aux_loss_in_forward = previous.aux_loss_in_forward
    setattr(target, STATE_ATTR, state)
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
    target = target_model(model)
    state = getattr(target, STATE_ATTR, None)
    if state is not None:
        if installed_forward(target) is not None:
            if state.own_forward:
                target.forward = state.original_forward
            else:
                del target.forward  # back to the class's forward
        delattr(target, STATE_ATTR)
        target.__dict__.pop("accepts_loss_kwargs", None)
    return model


def is_gem_applied(model) -> bool:
    """True when a training call of ``model`` with labels runs apply_gem's GEM forward: the patch
    state is there and the forward apply_gem installed is still the one called (False after
    :func:`remove_gem`, and after e.g. Liger's fused cross-entropy replaced the forward).

    Args:
        model: any object (a model or PEFT wrapper); never raises.
    """
    target = target_model(model)
    return getattr(target, STATE_ATTR, None) is not None and installed_forward(target) is not None
