"""Bad input gets a clear error naming the argument, before any kernel runs."""

import pytest
import torch
from helpers import DEVICE, make_inputs

from gem_kernels import gem_loss

GOOD = make_inputs(n=4, vocab=10, ignore_frac=0.0)

BAD_OPTIONS = [
    ({"beta": 0}, ValueError, "beta"),
    ({"beta": -0.5}, ValueError, "beta"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": "0.7"}, ValueError, "beta"),
    ({"h": "quadratic"}, ValueError, "h must be one of"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"impl": "cuda"}, ValueError, "impl"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"logit_scale": 0.0}, ValueError, "logit_scale"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": 0}, ValueError, "softcap"),
    ({"z_loss_scale": -1e-4}, ValueError, "z_loss_scale"),
    ({"return_ce": 1}, TypeError, "return_ce"),
    ({"inplace_backward": "yes"}, TypeError, "inplace_backward"),
    ({"inplace_backward": True, "impl": "reference"}, ValueError, "inplace_backward"),
    ({"num_items_in_batch": -1}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": 5, "reduction": "sum"}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": torch.ones(2)}, ValueError, "num_items_in_batch"),
    ({"num_items_in_batch": torch.tensor(-2)}, ValueError, "num_items_in_batch must be >= 0"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_OPTIONS, ids=[str(k) for k, _, _ in BAD_OPTIONS])
def test_bad_options(kwargs, exc, match):
    logits, labels = GOOD
    with pytest.raises(exc, match=match):
        gem_loss(logits, labels, **kwargs)


def _bad_tensors():
    logits, labels = GOOD
    return [
        ("logits list", [[0.0]], labels, TypeError, "logits must be a torch.Tensor"),
        ("int logits", logits.long(), labels, TypeError, "logits must have dtype"),
        (
            "scalar logits",
            torch.tensor(1.0, device=DEVICE),
            torch.tensor(0, device=DEVICE),
            ValueError,
            "at least one dimension",
        ),
        ("empty vocab", torch.zeros(4, 0, device=DEVICE), labels, ValueError, "vocabulary dimension"),
        ("float labels", logits, labels.float(), TypeError, "labels must be an integer tensor"),
        ("bool labels", logits, labels > 0, TypeError, "labels must be an integer tensor"),
        ("shape", logits, labels[:3], ValueError, r"labels must have shape \(4,\)"),
        ("rank", logits, labels[None], ValueError, "labels must have shape"),
        (
            "label too big",
            logits,
            torch.tensor([0, 1, 10, 2], device=DEVICE),
            ValueError,
            r"labels must lie in \[0, 10\).*found 10",
        ),
        ("negative label", logits, torch.tensor([0, -1, 3, 2], device=DEVICE), ValueError, "found -1"),
        ("meta device", logits, labels.to("meta"), ValueError, "same device"),
    ]


@pytest.mark.parametrize("name,logits,labels,exc,match", _bad_tensors(), ids=[c[0] for c in _bad_tensors()])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_tensors(name, logits, labels, exc, match, impl):
    with pytest.raises(exc, match=match):
        gem_loss(logits, labels, impl=impl)


def test_float64_is_refused_by_triton_but_fine_for_torch():
    logits, labels = make_inputs(n=3, vocab=7, dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='triton' supports"):
        gem_loss(logits, labels, impl="triton")
    assert gem_loss(logits, labels, impl="torch").dtype == torch.float64


def test_ignore_index_may_be_any_int():
    logits, labels = make_inputs(n=6, vocab=9, ignore_frac=0.0)
    labels[:2] = 12345
    a = gem_loss(logits, labels, ignore_index=12345, reduction="none")
    assert torch.equal(a[:2], torch.zeros(2, device=DEVICE))


def test_works_without_triton_installed():
    """CPU users without triton get the torch path from impl='auto' and a clear error for 'triton'."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from gem_kernels import gem_loss, fused_linear_gem_loss\n"
        "x = torch.randn(4, 10, requires_grad=True); y = torch.tensor([1, 2, 3, -100])\n"
        "gem_loss(x, y).backward()\n"
        "fused_linear_gem_loss(torch.randn(4, 3), torch.randn(10, 3), y)\n"
        "try:\n"
        "    gem_loss(x, y, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "refused: impl='triton' needs the triton package" in out.stdout


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("num_items", [0, torch.tensor(0), torch.tensor(0.0)])
def test_zero_num_items_with_all_ignored_is_zero_not_nan(impl, num_items):
    """A fully masked accumulation window (Trainer passes num_items_in_batch = 0) gives 0, not NaN."""
    from gem_kernels import fused_linear_gem_loss

    logits, labels = make_inputs(n=4, vocab=10)
    labels = torch.full_like(labels, -100)
    loss = gem_loss(logits, labels, num_items_in_batch=num_items, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits.grad))
    hidden = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    weight = torch.randn(10, 3, device=DEVICE, requires_grad=True)
    loss = fused_linear_gem_loss(hidden, weight, labels, num_items_in_batch=num_items, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.isnan().any() and not weight.grad.isnan().any()
