"""The one input factory and the one comparison helper every test uses, and the test device.

The suite runs on one device, chosen once per run by :func:`select_device`: CUDA when a GPU is
available (Triton kernels compiled for it), else the CPU with the Triton interpreter
(``tests/conftest.py`` switches it on only then). ``GEM_TEST_DEVICE=cpu`` or ``cuda`` forces the
choice; ``cuda`` without a usable GPU is an error, not a silent fallback. ``make_inputs`` creates
its tensors on that device, and the tolerances below are the same on both.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

DEVICE_VARIABLE = "GEM_TEST_DEVICE"


def select_device(value: Optional[str] = None, cuda_available: Optional[bool] = None) -> str:
    """The test device: "cuda" or "cpu".

    value: the setting ("", "auto", "cpu" or "cuda"; default: the GEM_TEST_DEVICE environment
        variable, unset = "auto"). "auto" is "cuda" when ``cuda_available`` (default:
        ``torch.cuda.is_available()``), else "cpu".
    Raises ValueError for any other value, and RuntimeError for "cuda" without a usable GPU.
    """
    if value is None:
        value = os.environ.get(DEVICE_VARIABLE, "")
    value = value.strip().lower()
    if value not in ("", "auto", "cpu", "cuda"):
        raise ValueError(f"{DEVICE_VARIABLE} must be 'cpu', 'cuda' or 'auto' (or unset), got {value!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if value == "cuda" and not cuda_available:
        raise RuntimeError(f"{DEVICE_VARIABLE}=cuda, but torch.cuda.is_available() is False (torch "
                           f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); unset it or use "
                           f"{DEVICE_VARIABLE}=cpu to run on the CPU with the Triton interpreter")
    if value in ("", "auto"):
        return "cuda" if cuda_available else "cpu"
    return value


# conftest.py validated the setting before any test module is imported, so this does not raise here.
DEVICE = select_device()
ON_CUDA = DEVICE == "cuda"

# Absolute/relative tolerances per dtype for comparing against a float64 truth, used when no
# same-dtype PyTorch baseline is available.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def make_inputs(
    n: int = 24,
    vocab: int = 1001,
    *,
    dtype: torch.dtype = torch.float32,
    lead: Optional[Sequence[int]] = None,
    ignore_frac: float = 0.25,
    ignore_index: int = -100,
    scale: float = 3.0,
    seed: int = 0,
    requires_grad: bool = True,
    device: Optional[str] = None,
):
    """logits [*lead, vocab] (normal * scale, in ``dtype``) and labels [*lead] with about
    ``ignore_frac`` of them set to ``ignore_index``, on ``device`` (default: the test device,
    :data:`DEVICE`). ``lead`` defaults to (n,). The numbers are drawn on the CPU, so a seed gives
    the same inputs on every device."""
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead) if lead is not None else (n,)
    logits = (torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab, lead, generator=g)
    if ignore_frac > 0:
        drop = torch.rand(lead, generator=g) < ignore_frac
        labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    device = device or DEVICE
    logits, labels = logits.to(device), labels.to(device)
    logits.requires_grad_(requires_grad)
    return logits, labels


def fresh(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A detached copy (optionally cast) that requires grad like ``x``."""
    y = x.detach().clone()
    if dtype is not None:
        y = y.to(dtype)
    return y.requires_grad_(x.requires_grad)


def _describe(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a = actual.detach().double().reshape(-1)
    e = expected.detach().double().reshape(-1)
    if a.numel() == 0:
        return "empty"
    diff = (a - e).abs()
    i = int(diff.argmax())
    rel = diff / e.abs().clamp(min=1e-12)
    return (f"max abs err {diff[i].item():.3e} at flat index {i} (actual {a[i].item():.6g}, "
            f"expected {e[i].item():.6g}); max rel err {rel.max().item():.3e}; "
            f"nan actual/expected {int(a.isnan().sum())}/{int(e.isnan().sum())}")


def assert_close(actual, expected, *, what: str, dtype: Optional[torch.dtype] = None,
                 atol: Optional[float] = None, rtol: Optional[float] = None,
                 baseline: Optional[torch.Tensor] = None, margin: float = 2.0):
    """Assert ``actual`` matches ``expected`` (usually the float64 truth) with a verbose message.

    With ``baseline`` (the same computation done by plain PyTorch in the same dtype), the error of
    ``actual`` must not exceed ``margin`` times the baseline's own error plus the dtype's atol:
    the kernel may be as inexact as PyTorch itself is in that dtype, and not much more.
    Otherwise the per-dtype ``TOLERANCES`` (or explicit atol/rtol) apply.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    dt = dtype or (actual.dtype if actual.dtype in TOLERANCES else torch.float32)
    d_atol, d_rtol = TOLERANCES[dt]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double()
    e = expected.detach().double()
    assert not a.isnan().any(), f"{what}: NaN in result; {_describe(actual, expected)}"
    if baseline is not None:
        err = (a - e).abs().max().item() if a.numel() else 0.0
        base = (baseline.detach().double() - e).abs().max().item() if a.numel() else 0.0
        bound = margin * base + atol
        assert err <= bound, (f"{what} [{dt}]: error {err:.3e} exceeds {margin} x same-dtype PyTorch "
                              f"error {base:.3e} + atol {atol:.1e}; {_describe(actual, expected)}")
        return
    ok = (a - e).abs() <= atol + rtol * e.abs()
    assert bool(ok.all()), f"{what} [{dt}] (atol {atol:.1e}, rtol {rtol:.1e}): {_describe(actual, expected)}"


def only_on(device: str, reason: str):
    """Mark a test that only makes sense on ``device`` ("cpu" or "cuda"): skipped elsewhere, with
    ``reason`` (say why, e.g. "counts bytes under the Triton interpreter")."""
    import pytest

    return pytest.mark.skipif(DEVICE != device, reason=f"{device} only: {reason}")
