"""The whole-gradient scaling kernel (ops/grad_scale.py) and the factor the fused path hands it.

The fused path computes its gradients in the forward with the reduction's token weight folded in;
backward rescales them by upstream / token weight. When the loss is backpropagated as is that
factor must be exactly 1, so the kernel skips the pass over the [V, H] weight gradient on the device.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, ON_CUDA, only_on

from benchmarks.traffic import count_traffic
from gem_kernels import fused_linear_gem_loss
from gem_kernels.autograd import fused_linear as fused_autograd
from gem_kernels.ops import scale_grad_

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUMEL = 2 * 8192 + 37  # three programs, the last one partly masked


def _grad(dtype, numel=NUMEL, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(numel, generator=g, dtype=torch.float64) * 5).to(dtype).to(DEVICE)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of x (in x's dtype), as float64."""
    bits = torch.finfo(x.dtype).eps
    mag = x.double().abs().clamp(min=torch.finfo(x.dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * bits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_factor_one_leaves_every_bit(dtype):
    grad = _grad(dtype)
    grad[0] = float("nan")  # untouched, not even multiplied by 1
    before = grad.clone()
    scale_grad_(grad, torch.ones(1, device=DEVICE))
    assert torch.equal(
        grad.view(torch.int16 if dtype != torch.float32 else torch.int32),
        before.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [1.0 / 3.0, 1024.0, -0.75])
def test_factor_applied_in_fp32_rounded_once(dtype, factor):
    grad = _grad(dtype)
    f32 = torch.tensor([factor], dtype=torch.float32, device=DEVICE)
    exact = grad.double() * f32.double()  # the fp32 product is exact enough: one rounding to dtype follows
    expected = (grad.float() * f32).to(dtype)
    scale_grad_(grad, f32)
    if ON_CUDA or dtype == torch.float32:
        assert torch.equal(grad, expected), f"{dtype}: differs from the fp32 product rounded once"
    else:
        # the Triton interpreter truncates fp32 -> bf16/fp16 stores instead of rounding: one ulp
        err = (grad.double() - exact).abs()
        assert bool((err <= _ulp(exact.to(dtype))).all()), f"{dtype}: error over one ulp, max {err.max():.3e}"
    # a bf16 factor would be off by up to 2^-9 relative: the kernel must not round the factor
    if dtype == torch.bfloat16 and factor == 1.0 / 3.0:
        rounded_factor = grad.float() * torch.tensor(factor, dtype=torch.bfloat16).float()
        assert not torch.equal(grad.float(), rounded_factor)


@only_on("cpu", "counts bytes under the Triton interpreter")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_skipped_pass_costs_one_scalar_per_program(dtype):
    grad = _grad(dtype)
    programs = -(-NUMEL // 8192)
    skipped = count_traffic(scale_grad_, grad, torch.ones(1))
    assert (skipped.loaded_bytes, skipped.stored_bytes) == (4 * programs, 0)
    scaled = count_traffic(scale_grad_, grad, torch.full((1,), 0.5))
    size = grad.element_size()
    assert scaled.loaded_bytes == 4 * programs + NUMEL * size
    assert scaled.stored_bytes == NUMEL * size


def test_bad_arguments_are_refused():
    grad = _grad(torch.float32, numel=37 * 8).reshape(-1, 37)
    with pytest.raises(ValueError, match="contiguous"):
        scale_grad_(grad.t(), torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="factor must be a one-element fp32"):
        scale_grad_(grad, torch.ones(1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="factor must be a one-element fp32"):
        scale_grad_(grad, torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="grad dtype"):
        scale_grad_(grad.double(), torch.ones(1, device=DEVICE))


def _captured_factor(monkeypatch, run):
    seen = []

    def spy(grads, scale):
        seen.append(scale.detach().clone())
        real(grads, scale)

    real = fused_autograd.scale_grads_
    monkeypatch.setattr(fused_autograd, "scale_grads_", spy)
    run()
    assert len(seen) == 1, f"expected one rescaling of the precomputed gradients, got {len(seen)}"
    return seen[0]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction,items", [("mean", None), ("sum", None), ("mean", 7), ("mean", "tensor")])
def test_fused_factor_is_exactly_one_for_a_loss_backpropagated_as_is(monkeypatch, impl, dtype, reduction, items):
    """The token weight is computed in the loss's dtype with autograd's own operation, so the
    upstream / token-weight factor is exactly 1 and the device skips the rescaling pass; a scaled
    loss gives its scale (to the rounding autograd applies)."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on impl='torch' only")
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(13, 16, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(37, 16, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 37, (13,), generator=g).to(DEVICE)
    labels[::4] = -100
    num = torch.tensor(7, device=DEVICE) if items == "tensor" else items
    for mult in (1.0, 3.0):

        def run(mult=mult):
            loss = fused_linear_gem_loss(hidden, weight, labels, reduction=reduction, num_items_in_batch=num, impl=impl)
            (loss * mult if mult != 1.0 else loss).backward()

        factor = _captured_factor(monkeypatch, run).item()
        if mult == 1.0:
            assert factor == 1.0, f"factor {factor!r} for a loss backpropagated as is: the rescaling is not skipped"
        else:  # autograd rounds mult * token weight in the loss's dtype: within one ulp of it
            eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
            assert abs(factor - mult) <= mult * eps, f"factor {factor!r} for a loss multiplied by {mult}"
        monkeypatch.undo()
