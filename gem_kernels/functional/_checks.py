"""Argument validation shared by the functional API: every check runs before any kernel does,
and every error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from ..autograd import triton_available
from ..options import H_CHOICES, IMPLS, MAX_METRICS_VOCAB, OPTION_DEFAULTS, OPTION_NAMES, REDUCTIONS, GEMOptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


_WHO = {"gem": "gem_loss", "fused": "fused_linear_gem_loss"}


def check_options(kind: str, **options) -> GEMOptions:
    """Validate the keyword options of one GEM call and pack them into a :class:`GEMOptions`.

    This is the one place options are checked: everything below the functional layer takes the
    returned dataclass as it is.

    Args:
        kind: "gem" (the options of ``gem_loss`` / ``GEMLoss``) or "fused" (those of
            ``fused_linear_gem_loss`` / ``FusedLinearGEMLoss``).
        **options: any subset of that function's keyword options (``options.OPTION_NAMES[kind]``:
            beta, h, ignore_index, reduction, logit_scale, softcap, z_loss_scale, return_ce,
            return_metrics, validate_labels, impl, and inplace_backward for "gem", chunk_size and
            low_memory for "fused"), with the meanings, types and defaults of those functions. Not
            options (per call): num_items_in_batch (see :func:`check_num_items`), process_group and
            vocab_start.

    Returns:
        GEMOptions with numbers normalised (floats as float, ignore_index / chunk_size as int),
        ``vocab_start`` 0 and ``impl`` as given ("auto" included).

    Raises:
        TypeError: an option name that ``kind`` does not have (the message lists the allowed ones);
            ignore_index not an int; return_ce, return_metrics, inplace_backward, validate_labels or
            low_memory not a bool.
        ValueError: an unknown kind; beta or logit_scale not a finite number > 0; softcap not None
            or a finite number > 0; z_loss_scale not a finite number >= 0; an unknown h, reduction or
            impl; inplace_backward with impl="reference"; chunk_size not None or an int >= 1.
    """
    names = OPTION_NAMES.get(kind)
    if names is None:
        raise ValueError(f"kind must be one of {tuple(OPTION_NAMES)}, got {kind!r}")
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {_WHO[kind]}; allowed: {sorted(names)}")
    o = {**OPTION_DEFAULTS, **options}
    beta, h, ignore_index, softcap = o["beta"], o["h"], o["ignore_index"], o["softcap"]
    logit_scale, z_loss_scale, impl, chunk_size = o["logit_scale"], o["z_loss_scale"], o["impl"], o["chunk_size"]
    if not _is_real(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if h not in H_CHOICES:
        raise ValueError(f"h must be one of {H_CHOICES}, got {h!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if o["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {o['reduction']!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not _is_real(logit_scale) or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (not _is_real(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not _is_real(z_loss_scale) or not math.isfinite(z_loss_scale) or z_loss_scale < 0:
        raise ValueError(f"z_loss_scale must be a finite number >= 0, got {z_loss_scale!r}")
    for name in ("return_ce", "return_metrics", "inplace_backward", "validate_labels", "low_memory"):
        if not isinstance(o[name], bool):
            raise TypeError(f"{name} must be a bool, got {o[name]!r}")
    if o["inplace_backward"] and impl == "reference":
        raise ValueError("inplace_backward=True is not available with impl='reference'")
    if chunk_size is not None and (
        not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1 (valid tokens per chunk), got {chunk_size!r}")
    return GEMOptions(
        beta=float(beta),
        h=h,
        ignore_index=int(ignore_index),
        logit_scale=float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        z_loss_scale=float(z_loss_scale),
        return_ce=o["return_ce"],
        inplace_backward=o["inplace_backward"],
        return_metrics=o["return_metrics"],
        reduction=o["reduction"],
        impl=impl,
        validate_labels=o["validate_labels"],
        chunk_size=None if chunk_size is None else int(chunk_size),
        low_memory=o["low_memory"],
    )


def check_num_items(num_items_in_batch, reduction: str) -> None:
    """``num_items_in_batch`` (per call, not an option): None, or with reduction="mean" a number >= 0
    or a one-element tensor (>= 0, checked on the host only for a CPU tensor: no device sync; under
    torch.compile a device-side assert). Raises ValueError otherwise."""
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the denominator of reduction='mean'; "
            f"it cannot be used with reduction={reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, "
                f"got a tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        if torch.compiler.is_compiling():
            # a host branch on a tensor value would break the graph: a check the graph keeps
            torch._assert_async(num_items_in_batch.reshape(()) >= 0, "num_items_in_batch must be >= 0")
        elif num_items_in_batch.device.type == "cpu" and not bool(num_items_in_batch.reshape(()) >= 0):
            # checked where it costs no device sync (Hugging Face passes a CPU or device tensor)
            raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch.item()}")
    elif not _is_real(num_items_in_batch) or not num_items_in_batch >= 0:
        raise ValueError(f"num_items_in_batch must be a number >= 0 or a tensor, got {num_items_in_batch!r}")


def index_labels(labels):
    """Type-check ``labels`` as an integer tensor and widen narrow integer dtypes to int64, so that
    comparisons with a negative ignore_index (and indexing) behave; int32/int64 pass through."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    return labels if labels.dtype in (torch.int32, torch.int64) else labels.long()


def check_labels(
    labels,
    name_shape: str,
    expected_shape,
    device,
    num_classes: Optional[int],
    ignore_index: int,
    validate_range: bool = True,
):
    """labels must be an integer tensor of ``expected_shape`` on ``device`` with every non-ignored
    value in [0, num_classes).

    The range check (skipped when ``validate_range`` is False or ``num_classes`` is None):
    in eager mode it reads one reduced value back (a device sync on GPU) and raises ValueError
    naming the first bad label; under torch.compile it is a device-side assert kept in the graph
    (``torch._assert_async``): no host branch, no graph break, and a RuntimeError carrying
    ``LABEL_RANGE_MESSAGE`` when it fails (on CUDA reported as a device-side assert, asynchronously).
    """
    labels = index_labels(labels)
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels must have shape {tuple(expected_shape)} (the leading shape of "
            f"{name_shape}), got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as {name_shape} ({device}), got {labels.device}")
    if validate_range and num_classes is not None and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if torch.compiler.is_compiling():
            torch._assert_async(
                ~bad.any(),
                f"{LABEL_RANGE_MESSAGE}: labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
            )
        elif bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {first}"
            )


# Start of the message of the device-side label check under torch.compile (tests match it).
LABEL_RANGE_MESSAGE = "gem_kernels: labels out of range"


def check_float_tensor(x, name: str, allowed=TORCH_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in allowed)}, got {x.dtype}")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors (or under TRITON_INTERPRET=1) in a kernel dtype, else 'torch'.
    Under torch.compile, CPU tensors get 'torch' even with TRITON_INTERPRET=1: the interpreter cannot be traced."""
    if impl == "auto":
        on_device = x.is_cuda or (interpreting() and not torch.compiler.is_compiling())
        if x.dtype in FLOAT_DTYPES and on_device and triton_available():
            return "triton"
        return "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package; install it or use impl='torch'")
        if not (x.is_cuda or interpreting()):
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter); got a tensor on {x.device}. Use impl='torch' on CPU"
            )
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"impl='triton' supports {tuple(str(d) for d in FLOAT_DTYPES)}, got {x.dtype}; "
                f"use impl='torch' for float64"
            )
    return impl


def check_metrics_vocab(return_metrics: bool, vocab_end: int, name: str) -> None:
    """The arg-max index travels as an exact integer in an fp32 column: it must stay below 2^24."""
    if return_metrics and vocab_end > MAX_METRICS_VOCAB:
        raise ValueError(
            f"return_metrics=True supports vocabularies of at most {MAX_METRICS_VOCAB} columns "
            f"(2^24: the arg-max index is carried exactly in fp32); {name} reach column {vocab_end}"
        )


def check_options_type(options) -> None:
    """The ``*_with_options`` functions take options made by :func:`check_options` (not re-checked)."""
    if not isinstance(options, GEMOptions):
        raise TypeError(
            f"options must be a GEMOptions (from gem_kernels.functional.check_options), got {type(options).__name__}"
        )
