"""return_metrics: ce, entropy and token accuracy from the same pass, against the float64 reference
(which computes them from the materialised distribution), for every impl, option, dtype and reduction."""

import pytest
import torch
from helpers import DEVICE, assert_close, fresh, make_inputs

from gem_kernels import FusedLinearGEMLoss, GEMLoss, fused_linear_gem_loss, gem_loss
from gem_kernels.reference import gem_loss_reference

NAMES = ("ce", "entropy", "token_accuracy")
IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTION_SETS = {
    "plain": {},
    "logsigmoid_beta0.5": {"h": "logsigmoid", "beta": 0.5},
    "scale": {"logit_scale": 0.37},
    "softcap": {"softcap": 4.0},
    "everything": {
        "h": "logsigmoid",
        "beta": 0.5,
        "logit_scale": 1.2,
        "softcap": 5.0,
        "z_loss_scale": 1e-2,
        "return_ce": True,
    },
}
REDUCTIONS = {
    "mean": {},
    "mean_items": {"num_items_in_batch": 7},
    "mean_items_tensor": {"num_items_in_batch": torch.tensor(11)},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def _split(out, return_ce):
    """(loss, ce or None, metrics) of a return_metrics call."""
    assert isinstance(out, tuple) and isinstance(out[-1], dict), type(out)
    assert len(out) == (3 if return_ce else 2)
    return out[0], (out[1] if return_ce else None), out[-1]


def _check_metrics(metrics, truth, base, dtype, what, loss_dtype=torch.float32):
    assert set(metrics) == set(NAMES), sorted(metrics)
    for name in NAMES:
        m = metrics[name]
        assert m.dtype == loss_dtype and not m.requires_grad, f"{what} {name}: {m.dtype} {m.requires_grad}"
        if name == "token_accuracy" and m.dim() > 0:
            # Per token it is 0 or 1 and must be exactly the reference's arg-max verdict.
            assert torch.equal(m.double(), truth[name]), f"{what} token_accuracy: {m} vs {truth[name]}"
        assert_close(m, truth[name], what=f"{what} {name}", dtype=dtype, baseline=base[name])


def _reference_metrics(logits, labels, dtype, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("impl", "inplace_backward", "return_ce")}
    return gem_loss_reference(logits.detach().to(dtype), labels, return_metrics=True, **kw)[1]


def _with_neg_inf(logits):
    """A masked vocabulary: some -inf logits, including a whole leading block of 4096 in one row
    when V > 4096 (the Triton pass then starts from a max of -inf)."""
    z = logits.detach().clone()
    z[0, 3:50] = float("-inf")
    z[1, ::3] = float("-inf")
    if z.shape[-1] > 4096:
        z[2, :4096] = float("-inf")
    return z.requires_grad_(True)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_metrics_match_reference(impl, dtype, options):
    kw = OPTION_SETS[options]
    logits, labels = make_inputs(n=19, vocab=1001, dtype=dtype, seed=len(options))
    out = gem_loss(fresh(logits), labels, impl=impl, return_metrics=True, **kw)
    loss, ce, metrics = _split(out, kw.get("return_ce", False))
    truth = _reference_metrics(logits, labels, torch.float64, **kw)
    base = _reference_metrics(logits, labels, dtype, **kw)
    _check_metrics(metrics, truth, base, dtype, f"{impl} {dtype} {options}")
    if ce is not None:
        assert torch.equal(ce, metrics["ce"]), "return_ce and metrics['ce'] must be the same value"


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS), ids=list(REDUCTIONS))
def test_metrics_reductions_ignored_and_neg_inf(impl, reduction):
    kw = dict(REDUCTIONS[reduction], h="logsigmoid", softcap=8.0)
    logits, labels = make_inputs(n=7, vocab=4099, dtype=torch.float32, ignore_frac=0.3, seed=3)
    labels[0], labels[1] = 60, 1  # finite label logits in the masked rows
    labels[2] = 4097  # in row 2's only finite block
    z = _with_neg_inf(logits)
    _, metrics = gem_loss(z, labels, impl=impl, return_metrics=True, **kw)
    ref_in = z.detach().double()
    truth = gem_loss_reference(ref_in, labels, return_metrics=True, **kw)[1]
    base = gem_loss_reference(z.detach(), labels, return_metrics=True, **kw)[1]
    _check_metrics(metrics, truth, base, torch.float32, f"{impl} {reduction} -inf")


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_ties_go_to_the_lowest_index(impl):
    """Equal maxima: the lowest vocabulary index is the arg-max, in every block position."""
    V = 4099  # two Triton blocks of 4096: ties inside a block and across blocks
    z = torch.randn(4, V, device=DEVICE)
    pairs = [(7, 200), (7, 4098), (4095, 4096), (0, V - 1)]
    for row, (a, b) in enumerate(pairs):
        z[row, a] = z[row, b] = 10.0
    labels_low = torch.tensor([a for a, _ in pairs], device=DEVICE)
    labels_high = torch.tensor([b for _, b in pairs], device=DEVICE)
    for labels, want in ((labels_low, 1.0), (labels_high, 0.0)):
        _, m = gem_loss(z, labels, impl=impl, reduction="none", return_metrics=True)
        assert torch.equal(m["token_accuracy"].cpu(), torch.full((4,), want)), (impl, labels, m["token_accuracy"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_metrics_leave_loss_and_gradient_unchanged(impl, dtype, inplace):
    """Asking for the statistics changes nothing else: the same loss and gradient, bit for bit."""
    logits, labels = make_inputs(n=11, vocab=517, dtype=dtype, seed=5)
    results = []
    for metrics in (False, True):
        x = fresh(logits)
        out = gem_loss(
            x * 1 if inplace else x,
            labels,
            impl=impl,
            z_loss_scale=1e-2,
            return_ce=True,
            return_metrics=metrics,
            inplace_backward=inplace,
        )
        out[0].backward()
        results.append((out[0].detach(), out[1], x.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_metrics_leave_loss_and_gradients_unchanged(impl):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(21, 8, generator=g).to(DEVICE), torch.randn(97, 8, generator=g).to(DEVICE)
    labels = torch.randint(0, 97, (21,), generator=g).to(DEVICE)
    labels[::3] = -100
    results = []
    for metrics in (False, True):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fused_linear_gem_loss(xs, ws, labels, impl=impl, chunk_size=5, return_ce=True, return_metrics=metrics)
        out[0].backward()
        results.append((out[0].detach(), out[1], xs.grad, ws.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zeros(impl):
    logits, labels = make_inputs(n=5, vocab=33)
    labels[:] = -100
    for red in ("mean", "sum"):
        loss, m = gem_loss(logits, labels, impl=impl, reduction=red, return_metrics=True)
        assert all(float(v) == 0.0 for v in m.values()), m


def test_float64_metrics_are_float64():
    logits, labels = make_inputs(n=6, vocab=101, dtype=torch.float64)
    _, m = gem_loss(logits, labels, impl="torch", return_metrics=True)
    truth = gem_loss_reference(logits.detach(), labels, return_metrics=True)[1]
    for name in NAMES:
        assert m[name].dtype == torch.float64
        assert_close(m[name], truth[name], what=f"float64 {name}")


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean_items", "none"])
def test_fused_linear_metrics(impl, dtype, reduction):
    g = torch.Generator().manual_seed(1)
    N, H, V = 23, 16, 301
    x = torch.randn(N, H, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.75).to(DEVICE, dtype)
    labels = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    labels[::4] = -100
    kw = dict(REDUCTIONS[reduction], softcap=6.0, h="logsigmoid")
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, metrics = fused_linear_gem_loss(xs, ws, labels, impl=impl, chunk_size=8, return_metrics=True, **kw)
    loss.sum().backward()
    logits = torch.nn.functional.linear(x.double(), w.double())
    truth = gem_loss_reference(logits, labels, return_metrics=True, **kw)[1]
    base = gem_loss_reference(torch.nn.functional.linear(x, w), labels, return_metrics=True, **kw)[1]
    _check_metrics(metrics, truth, base, dtype, f"fused {impl} {dtype} {reduction}")


def test_modules_and_validation():
    logits, labels = make_inputs(n=6, vocab=50)
    loss, m = GEMLoss(return_metrics=True, impl="torch")(logits, labels)
    assert set(m) == set(NAMES)
    x, w = torch.randn(6, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    loss, ce, m = FusedLinearGEMLoss(return_metrics=True, return_ce=True)(x, w, labels)
    assert torch.equal(ce, m["ce"])
    with pytest.raises(TypeError, match="return_metrics must be a bool"):
        gem_loss(logits, labels, return_metrics=1)
    with pytest.raises(TypeError, match="return_metrics must be a bool"):
        GEMLoss(return_metrics="yes")
    huge = torch.zeros(1, 1).expand(1, (1 << 24) + 1)
    with pytest.raises(ValueError, match="return_metrics=True supports vocabularies of at most"):
        gem_loss(huge, torch.tensor([0]), return_metrics=True, impl="torch")


@pytest.mark.parametrize("fused", [False, True])
def test_metrics_under_torch_compile_fullgraph(fused):
    """The compiled operators (autograd/compiled.py) carry the statistics with the same values as eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    if fused:
        x, w = torch.randn(20, 16, generator=g), torch.randn(97, 16, generator=g)
        y = torch.randint(0, 97, (20,), generator=g)  # CPU: the compiled torch path is what is tested
        y[::4] = -100

        def call(x, w, y):
            return fused_linear_gem_loss(x, w, y, impl="torch", return_ce=True, return_metrics=True)

        args = (x.requires_grad_(True), w.requires_grad_(True), y)
    else:
        z, y = make_inputs(n=24, vocab=257, seed=1, device="cpu")

        def call(z, y):
            return gem_loss(z, y, impl="torch", return_metrics=True, num_items_in_batch=torch.tensor(11))

        args = (z, y)
    try:
        out_c = torch.compile(call, fullgraph=True)(*args)
        out_e = call(*args)
        for name in NAMES:
            assert_close(
                out_c[-1][name], out_e[-1][name], what=f"compiled {name} (fused={fused})", atol=1e-6, rtol=1e-6
            )
        out_c[0].backward()
    finally:
        torch._dynamo.reset()
