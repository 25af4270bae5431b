"""Argument validation shared by the functional API: every check runs before any kernel does,
and every error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch

from ..options import H_CHOICES, IMPLS, MAX_METRICS_VOCAB, REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_options(*, beta, h, ignore_index, reduction, num_items_in_batch, logit_scale, softcap,
                  z_loss_scale, return_ce, impl, inplace_backward=False, validate_labels=True,
                  return_metrics=False):
    if not _is_real(beta) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if h not in H_CHOICES:
        raise ValueError(f"h must be one of {H_CHOICES}, got {h!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not _is_real(logit_scale) or not math.isfinite(logit_scale) or logit_scale <= 0:
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (not _is_real(softcap) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not _is_real(z_loss_scale) or not math.isfinite(z_loss_scale) or z_loss_scale < 0:
        raise ValueError(f"z_loss_scale must be a finite number >= 0, got {z_loss_scale!r}")
    if not isinstance(return_ce, bool):
        raise TypeError(f"return_ce must be a bool, got {return_ce!r}")
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {return_metrics!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if not isinstance(validate_labels, bool):
        raise TypeError(f"validate_labels must be a bool, got {validate_labels!r}")
    if inplace_backward and impl == "reference":
        raise ValueError("inplace_backward=True is not available with impl='reference'")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch replaces the denominator of reduction='mean'; "
                             f"it cannot be used with reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, "
                                 f"got a tensor of shape {tuple(num_items_in_batch.shape)}")
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


def check_labels(labels, name_shape: str, expected_shape, device, num_classes: Optional[int], ignore_index: int,
                 validate_range: bool = True):
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
        raise ValueError(f"labels must have shape {tuple(expected_shape)} (the leading shape of "
                         f"{name_shape}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as {name_shape} ({device}), got {labels.device}")
    if validate_range and num_classes is not None and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if torch.compiler.is_compiling():
            torch._assert_async(~bad.any(), f"{LABEL_RANGE_MESSAGE}: labels must lie in [0, {num_classes}) or "
                                            f"equal ignore_index={ignore_index}")
        elif bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                             f"found {first}")


# Start of the message of the device-side label check under torch.compile (tests match it).
LABEL_RANGE_MESSAGE = "gem_kernels: labels out of range"


def check_float_tensor(x, name: str, allowed=TORCH_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in allowed)}, got {x.dtype}")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


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
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                             f"interpreter); got a tensor on {x.device}. Use impl='torch' on CPU")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"impl='triton' supports {tuple(str(d) for d in FLOAT_DTYPES)}, got {x.dtype}; "
                            f"use impl='torch' for float64")
    return impl


def check_metrics_vocab(return_metrics: bool, vocab_end: int, name: str) -> None:
    """The arg-max index travels as an exact integer in an fp32 column: it must stay below 2^24."""
    if return_metrics and vocab_end > MAX_METRICS_VOCAB:
        raise ValueError(f"return_metrics=True supports vocabularies of at most {MAX_METRICS_VOCAB} columns "
                         f"(2^24: the arg-max index is carried exactly in fp32); {name} reach column {vocab_end}")
