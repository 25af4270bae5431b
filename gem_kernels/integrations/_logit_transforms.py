"""What a model does to ``lm_head(hidden)`` before returning its logits, and the check that the
fused path reproduces it.

The fused path never builds the logits, so it must apply the model's post-head transform itself
(``logit_scale``, then ``softcap``). Two layers keep that from going silently wrong:

* :func:`logit_transform_from_config` reads the config keys whose meaning is known, and refuses a
  config key that looks like an unknown logit transform until the caller passes the transform.
* :func:`probe_values` / :func:`check_probe`: on the first training step the output embedding hands
  the model a small probe ``[..., len(PROBE)]`` of known raw values instead of an empty tensor,
  the model applies its own transform to it, and the result is compared with the transform the
  fused path applies. This does not depend on any list of names.
"""

from __future__ import annotations

import math
import re

import torch

# How models that carry a logit multiplier in their config apply it between the LM head and the
# logits (read from transformers' modeling code). Keyed by model_type prefix.
_LOGITS_SCALING_DIVIDES = ("granite",)  # logits = lm_head(h) / logits_scaling
_LOGITS_SCALING_MULTIPLIES = ("hyperclovax",)  # logits = lm_head(h) * logits_scaling
_LOGITS_SCALING_ON_HIDDEN = ("minicpm",)  # h / logits_scaling before lm_head: nothing to add

# Softcap keys: logits = cap * tanh(lm_head(h) / cap). Gemma-2/3, RecurrentGemma, xLSTM.
_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Keys read above, or known not to act between the head and the logits (attention / router caps,
# initial values, hidden-state scalings applied before the head, counts and flags).
_KNOWN_KEYS = frozenset(
    _SOFTCAP_KEYS
    + ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logits_mup_width_multiplier")
)
_NOT_OUTPUT = re.compile(r"attn|attention|router|init|num_|to_keep|^output_logits$|^return_|^use_|std|mean")
# A config key that names the logits and a transform: refused unless known (see above).
_SUSPECT = re.compile(r"logit.*(cap|scal|mult|temp|factor)|(cap|scal|mult|temp|factor).*logit")

# Raw head outputs handed to the model on the first training step: they span the range where caps
# and scales show (a cap of 1000 moves 1024 to 771), and are exact in bf16 / fp16. Handed over in
# float32 whatever the head's dtype: the model's transform does not depend on the head's output
# dtype, and in bf16 (8 bits of mantissa) a scale within a few percent of the right one would hide
# in the rounding.
PROBE = (-1024.0, -64.0, -8.0, -1.0, -0.125, 0.0, 0.125, 1.0, 8.0, 64.0, 1024.0)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _unknown_transform_keys(text) -> list:
    """Config keys (with a value other than None / 0 / 1) that look like a post-head logit transform
    the reader below does not know."""
    keys = []
    for key, value in vars(text).items():
        if key.startswith("_") or key in _KNOWN_KEYS or _NOT_OUTPUT.search(key) or not _SUSPECT.search(key):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value in (0, 1):
            continue
        keys.append(f"{key}={value}")
    return keys


def logit_transform_from_config(config, *, logit_scale_given: bool = False, softcap_given: bool = False) -> tuple:
    """``(logit_scale, softcap)`` that the model's forward applies to ``lm_head(hidden)``.

    Reads ``final_logit_softcapping`` (Gemma-2/3), ``logits_soft_cap`` (RecurrentGemma),
    ``output_logit_soft_cap`` (xLSTM), ``logit_scale`` (Cohere), ``logits_scaling`` (Granite divides
    by it, HyperCLOVA X multiplies, MiniCPM3 scales the hidden states before the head),
    ``lm_head_multiplier`` (Falcon-H1) and ``output_multiplier``.

    Raises ValueError, instead of guessing, for a ``logits_scaling`` on a model type not listed here
    and for any other config key that names the logits and a cap / scale / multiplier / temperature
    (e.g. ``my_logit_cap=30``) with a value other than 0 / 1: pass ``logit_scale=`` / ``softcap=``
    to :func:`apply_gem` (explicit values override the config). A transform that no config key
    names is caught on the first training step by :func:`check_probe`.
    ``logit_scale_given`` / ``softcap_given``: the caller passes its own value, so none is derived
    (and an unknown key is no error).
    """
    text = _text_config(config)
    model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
    if not (logit_scale_given or softcap_given):
        unknown = _unknown_transform_keys(text)
        if unknown:
            raise ValueError(
                f"apply_gem: config of model_type {model_type!r} has {', '.join(unknown)}, which looks "
                f"like a transform of the logits that apply_gem does not know; pass logit_scale=... "
                f"(factor the head output is multiplied by) and/or softcap=... (cap * tanh(z / cap)) "
                f"explicitly, or use gem_compute_loss_func (the logits path)"
            )
    softcap = next((getattr(text, k) for k in _SOFTCAP_KEYS if getattr(text, k, None)), None)
    softcap = None if not softcap else float(softcap)
    if logit_scale_given:
        return 1.0, softcap
    scale = getattr(text, "logit_scale", None)
    ls = getattr(text, "logits_scaling", None)
    if scale is None and ls is not None and float(ls) != 1.0:
        if model_type.startswith(_LOGITS_SCALING_DIVIDES):
            scale = 1.0 / float(ls)
        elif model_type.startswith(_LOGITS_SCALING_MULTIPLIES):
            scale = float(ls)
        elif not model_type.startswith(_LOGITS_SCALING_ON_HIDDEN):
            raise ValueError(
                f"apply_gem: config has logits_scaling={ls} but how model_type {model_type!r} "
                f"applies it is unknown; pass logit_scale=... (the factor the logits are "
                f"multiplied by) explicitly"
            )
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    return (1.0 if scale is None else float(scale)), softcap


def probe_values(lead_shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``[*lead_shape, len(PROBE)]`` tensor holding PROBE at every position (a fresh, writable copy:
    a model may transform its logits in place)."""
    row = torch.tensor(PROBE, dtype=dtype, device=device)
    return row.expand(*lead_shape, len(PROBE)).clone()


def check_probe(logits, logit_scale: float, softcap, model_name: str) -> bool:
    """Raise ValueError unless the model turned the float32 probe into ``softcap(logit_scale * PROBE)``.

    ``logits``: what the model returned as its logits for the probe (``[..., len(PROBE)]``, float32
    unless the model rounds its logits to a narrower dtype itself). The tolerance is float32's
    (8 eps relative); a model that returns bf16 / fp16 logits adds that dtype's rounding (1 eps
    relative: its own rounding is half of that, per operation). Returns False when there was
    nothing to check (no token positions), True when checked. Under ``torch.compile`` the check is
    a device-side assert (RuntimeError with the same message, without the value list)."""
    hint = (
        "pass the right logit_scale= / softcap= to apply_gem, or use gem_compute_loss_func (the logits path, "
        "which takes the model's own logits)"
    )
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] != len(PROBE):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"apply_gem: could not check {model_name}'s logit transform: its forward turned a head output "
            f"of shape [..., {len(PROBE)}] into logits {got}; the fused path cannot tell what the model "
            f"does after its head; use gem_compute_loss_func (the logits path)"
        )
    raw = torch.tensor(PROBE, dtype=torch.float64)
    expected = raw * logit_scale
    if softcap is not None:
        expected = softcap * torch.tanh(expected / softcap)
    rows = logits.detach().reshape(-1, len(PROBE))
    if rows.shape[0] == 0:
        return False
    f32 = torch.finfo(torch.float32)
    tol = 8 * f32.eps * (1.0 + expected.abs())
    finfo = f32
    if logits.dtype.is_floating_point and torch.finfo(logits.dtype).eps > f32.eps:
        finfo = torch.finfo(logits.dtype)  # the model rounded its logits to this dtype itself
        tol = tol + finfo.eps * expected.abs()
    comparable = expected.abs() < finfo.max / 4  # a large multiplier may overflow fp16 on the probe alone
    message = (
        f"apply_gem: {model_name} transforms its head output in a way the fused path does not reproduce "
        f"(it applies logit_scale={logit_scale}, softcap={softcap})"
    )
    if torch.compiler.is_compiling():
        # Inside a torch.compile trace: the same comparison as a device-side assert (RuntimeError
        # with this message), so the patched forward stays one graph without a host read.
        exp = expected.to(device=rows.device, dtype=torch.float32)
        ok = ((rows[[0, -1]].float() - exp).abs() <= tol.to(exp)) | ~comparable.to(rows.device)
        torch._assert_async(ok.all(), f"{message}; {hint}")
        return True
    for got in (rows[0], rows[-1]):
        got = got.double().cpu()
        if not torch.all(((got - expected).abs() <= tol) | ~comparable):
            pairs = ", ".join(
                f"{x:g} -> {y:.6g} (expected {e:.6g})"
                for x, y, e in zip(PROBE, got.tolist(), expected.tolist())
                if not math.isclose(y, e)
            )
            raise ValueError(
                f"{message}: raw head output -> model logits: {pairs}. The loss would be GEM of other "
                f"logits than the model's; {hint}"
            )
    return True
