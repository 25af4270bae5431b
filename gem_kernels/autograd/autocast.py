"""torch.autocast around the fused lm_head path: the one place it is handled.

The lm_head matmul of the fused path runs in the autocast dtype, as ``F.linear`` would
(:func:`autocast_linear_inputs`), and everything after it runs with autocast off
(:func:`autocast_off`): the path picks its own precisions (fp32 statistics and accumulators), and an
autocast matmul inside it would silently run in low precision. Used by the functional layer, the
fused autograd Function and its torch.compile operators, and (through ``gem_kernels.functional``)
the trainer integrations.
"""

from __future__ import annotations

import contextlib

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for a device type autocast does not know."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError, TypeError):
        return False


def autocast_off(device_type: str):
    """A context that disables torch.autocast for ``device_type`` (a str such as "cuda" or "cpu")
    if it is on, else a no-op."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


def autocast_linear_inputs(hidden, weight, bias):
    """(hidden, weight, bias) as the lm_head matmul sees them under torch.autocast: float32 / float16
    / bfloat16 tensors cast to the autocast dtype of hidden's device type (float64 is left alone, as
    autocast does; ``bias`` may be None). Without autocast (or for non-tensor inputs, left for the
    caller's type checks) they are returned unchanged. The casts are differentiable, so fp32 master
    weights receive fp32 gradients."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return hidden, weight, bias
    device_type = hidden.device.type
    if not autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.dtype in _CASTABLE
        return t.to(dtype) if eligible and t.dtype != dtype else t

    return cast(hidden), cast(weight), cast(bias)
