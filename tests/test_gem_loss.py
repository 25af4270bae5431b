"""gem_loss (triton and torch paths) against the float64 reference, for every option and dtype."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, ON_CUDA, assert_close, check_gem_against_reference, fresh, make_inputs, run_gem

from gem_kernels import GEMLoss, gem_loss
from gem_kernels.reference import gem_loss_reference

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTION_SETS = {
    "plain": {},
    "beta0.3": {"beta": 0.3},
    "beta1.7": {"beta": 1.7},
    "scale": {"logit_scale": 0.37},
    "softcap": {"softcap": 4.0},
    "scale+softcap": {"logit_scale": 1.5, "softcap": 6.0},
    "bigcap": {"softcap": 1000.0},  # tanh near 0, where precision is easy to lose
    "zloss": {"z_loss_scale": 1e-3},
    "ce": {"return_ce": True},
    "everything": {"beta": 0.5, "logit_scale": 1.2, "softcap": 5.0, "z_loss_scale": 1e-2, "return_ce": True},
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", ["linear", "logsigmoid"])
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
def test_matches_reference(impl, dtype, h, options):
    logits, labels = make_inputs(n=19, vocab=1001, dtype=dtype, seed=hash(options) % 1000)
    check_gem_against_reference(logits, labels, impl, h=h, **OPTION_SETS[options])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "reduction,num_items", [("mean", None), ("mean", 7), ("mean", "tensor"), ("sum", None), ("none", None)]
)
def test_reductions(impl, reduction, num_items):
    if num_items == "tensor":
        num_items = torch.tensor(11)
    logits, labels = make_inputs(lead=(3, 7), vocab=517, dtype=torch.float32)
    check_gem_against_reference(logits, labels, impl, reduction=reduction, num_items_in_batch=num_items, return_ce=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [1, 2, 17, 4095, 4097, 12289])
def test_odd_vocab_sizes(impl, vocab):
    """Sizes around and across the 4096-element block, and degenerate ones."""
    logits, labels = make_inputs(n=5, vocab=vocab, ignore_frac=0.2)
    check_gem_against_reference(logits, labels, impl, h="logsigmoid", return_ce=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_vocab_262144(impl):
    logits, labels = make_inputs(n=2, vocab=262_147, ignore_frac=0.0, scale=2.0)
    check_gem_against_reference(logits, labels, impl, return_ce=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["row_stride", "shifted_3d", "int32_labels"])
def test_layouts(impl, layout):
    """Logits that are views (padded rows, a causal shift) and int32 labels."""
    base, labels = make_inputs(lead=(2, 9), vocab=300, requires_grad=False)
    if layout == "row_stride":
        wide = torch.randn(2, 9, 333, device=DEVICE)
        wide[..., :300] = base
        logits = wide[..., :300]
    elif layout == "shifted_3d":
        logits = base[:, :-1, :]
        labels = labels[:, 1:]
    else:
        logits = base
        labels = labels.to(torch.int32)
    check_gem_against_reference(logits.detach().requires_grad_(), labels, impl, reduction="none")


def test_beta_one_linear_gives_the_cross_entropy_gradient():
    logits, labels = make_inputs(n=16, vocab=333)
    for impl in IMPLS:
        _, grad = run_gem(logits, labels, impl=impl, beta=1.0, reduction="sum")
        x = fresh(logits)
        F.cross_entropy(x, labels, ignore_index=-100, reduction="sum").backward()
        assert_close(grad, x.grad, what=f"GEM(beta=1) grad vs CE grad ({impl})", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [6, 0], ids=["all_ignored", "empty"])
def test_all_ignored_batch_is_zero_not_nan(impl, reduction, n):
    logits, labels = make_inputs(n=n, vocab=100)
    labels = torch.full_like(labels, -100)
    outs, grad = run_gem(logits, labels, impl=impl, reduction=reduction, return_ce=True, z_loss_scale=1e-3)
    for o in outs:
        assert torch.equal(o, torch.zeros_like(o)), f"{impl}/{reduction}: {o}"
    assert torch.equal(grad, torch.zeros_like(grad)), f"{impl}/{reduction}: non-zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_overwrites_logits_with_the_gradient(impl, dtype):
    logits, labels = make_inputs(n=10, vocab=257, dtype=dtype, requires_grad=False)
    expected_outs, expected_grad = run_gem(logits.requires_grad_(), labels, impl=impl)
    x = logits.detach().clone()
    storage = x.data_ptr()
    leaf = x.requires_grad_()
    loss = gem_loss(leaf, labels, impl=impl, inplace_backward=True)
    loss.backward()
    assert leaf.grad.data_ptr() == storage, "the gradient does not live in the logits' storage"
    assert torch.equal(leaf.detach(), leaf.grad), "logits were not overwritten by the gradient"
    assert_close(leaf.grad, expected_grad, what="in-place gradient", dtype=dtype)
    assert_close(loss, expected_outs[0], what="loss with in-place backward")


@pytest.mark.parametrize("impl", IMPLS)
def test_default_does_not_mutate_inputs(impl):
    logits, labels = make_inputs(n=8, vocab=129)
    before, labels_before = logits.detach().clone(), labels.clone()
    run_gem(logits, labels, impl=impl)
    x = logits.detach().clone().requires_grad_()
    gem_loss(x, labels, impl=impl, h="logsigmoid", softcap=3.0, return_ce=True)[0].backward()
    assert torch.equal(x.detach(), before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("impl", IMPLS + ["reference"])
def test_extreme_bf16_logits_stay_finite(impl):
    logits, labels = make_inputs(n=8, vocab=1000, dtype=torch.bfloat16, ignore_frac=0.0, requires_grad=False)
    logits = torch.where(torch.rand(logits.shape, device=DEVICE) < 0.5, 1e4, -1e4).to(torch.bfloat16)
    logits[:, 0] = -1e4  # labels on both extremes
    labels[:4] = 0
    outs, grad = run_gem(logits.requires_grad_(), labels, impl=impl, return_ce=True, h="logsigmoid")
    assert all(torch.isfinite(o).all() for o in outs)
    assert torch.isfinite(grad).all()
    if impl != "reference":
        check_gem_against_reference(logits, labels, impl, return_ce=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_minus_inf(impl):
    """-inf logits (masked vocabulary entries) contribute nothing and give no NaN."""
    logits, labels = make_inputs(n=6, vocab=5000, ignore_frac=0.0, requires_grad=False)
    logits[:, 4100:] = float("-inf")
    labels = labels % 4100
    outs, grad = run_gem(logits.requires_grad_(), labels, impl=impl, return_ce=True, z_loss_scale=1e-3)
    ref_outs, ref_grad = run_gem(
        fresh(logits[:, :4100], torch.float64), labels, impl="reference", return_ce=True, z_loss_scale=1e-3
    )
    full_outs, full_grad = run_gem(
        fresh(logits, torch.float64), labels, impl="reference", return_ce=True, z_loss_scale=1e-3
    )
    for a, t, f in zip(outs, ref_outs, full_outs):
        assert_close(a, t, what="loss with -inf logits")
        assert_close(f, t, what="reference with -inf logits")
    assert_close(grad[:, :4100], ref_grad, what="grad with -inf logits")
    assert torch.equal(full_grad[:, 4100:], torch.zeros_like(full_grad[:, 4100:]))
    assert torch.equal(grad[:, 4100:], torch.zeros_like(grad[:, 4100:]))


def test_torch_path_second_backward_is_a_clear_error():
    logits, labels = make_inputs(n=4, vocab=50)
    loss = gem_loss(logits, labels, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_module_matches_functional():
    logits, labels = make_inputs(n=9, vocab=211)
    m = GEMLoss(beta=0.5, h="logsigmoid", reduction="sum")
    assert "beta=0.5" in repr(m)
    assert_close(
        m(logits, labels),
        gem_loss(logits, labels, beta=0.5, h="logsigmoid", reduction="sum"),
        what="GEMLoss vs gem_loss",
        atol=0,
        rtol=0,
    )
    mean = GEMLoss(beta=0.5, h="logsigmoid")
    assert_close(mean(logits, labels, num_items_in_batch=3) * 3, m(logits, labels), what="sum vs items", rtol=1e-6)
    with pytest.raises(TypeError, match="unknown option"):
        GEMLoss(bta=0.5)
    with pytest.raises(ValueError, match="beta"):
        GEMLoss(beta=0)


def test_auto_impl_choice(monkeypatch):
    from gem_kernels.functional._checks import resolve_impl

    x = torch.zeros(2, 3)  # resolve_impl reads TRITON_INTERPRET per call: both settings on any device
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", x) == "triton"
    assert resolve_impl("auto", x.double()) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", x) == "torch"
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        resolve_impl("triton", x)
    if ON_CUDA:
        assert resolve_impl("auto", x.to(DEVICE)) == "triton"


def test_loss_can_be_negative_and_equals_expected_logit_gap():
    """For linear h the loss is E_q[z] - z_y: negative when the label beats the q-average."""
    logits = torch.tensor([[5.0, 0.0, 0.0]], device=DEVICE)
    labels = torch.tensor([0], device=DEVICE)
    q = torch.softmax(logits / 0.7, -1)
    expected = (q * logits).sum() - 5.0
    for impl in IMPLS:
        got = gem_loss(logits, labels, impl=impl)
        assert got.item() < 0
        assert math.isclose(got.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["strided", "expanded", "uint8"])
def test_label_layouts_and_dtypes(impl, layout):
    """Labels that are strided views, 0-stride expansions or a narrow dtype (uint8, where the
    comparison with ignore_index=-100 must not wrap to 156)."""
    logits, labels = make_inputs(n=8, vocab=200, ignore_frac=0.0)
    if layout == "strided":
        labels = torch.stack([labels, labels.flip(0)], 1)[:, 1]
    elif layout == "expanded":
        labels = torch.tensor(7, device=DEVICE).expand(8)
    else:
        labels = labels.clone()
        labels[0] = 156
        labels = labels.to(torch.uint8)
    assert layout == "uint8" or not labels.is_contiguous()
    check_gem_against_reference(logits, labels.long() if layout == "uint8" else labels, impl, reduction="none")
    outs, grad = run_gem(logits, labels, impl=impl, reduction="none")
    ref_outs, ref_grad = run_gem(fresh(logits, torch.float64), labels.long(), impl="reference", reduction="none")
    assert_close(outs[0], ref_outs[0], what=f"{layout} labels loss")
    assert_close(grad, ref_grad, what=f"{layout} labels grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_ignores_rows_with_huge_logits(impl):
    """Ignored rows get exactly zero gradient even when their logits would overflow exp()."""
    logits, labels = make_inputs(n=8, vocab=300, ignore_frac=0.0, requires_grad=False)
    logits[:, 7] = 95.0
    labels[:4] = -100
    x = logits.clone().requires_grad_()
    gem_loss(x * 1.0, labels, beta=0.5, z_loss_scale=1e-3, impl=impl, inplace_backward=True).backward()
    _, expected = run_gem(logits.requires_grad_(), labels, beta=0.5, z_loss_scale=1e-3, impl="reference")
    assert_close(x.grad, expected, what="in-place grad with ignored huge rows")
    assert torch.equal(x.grad[:4], torch.zeros_like(x.grad[:4]))


def test_inplace_refuses_overlapping_rows():
    logits = torch.randn(1, 50, device=DEVICE).expand(4, 50).requires_grad_()
    with pytest.raises(ValueError, match="rows do not overlap"):
        gem_loss(logits, torch.arange(4, device=DEVICE), inplace_backward=True, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_gradient_keeps_the_upstream_scale(impl):
    """GradScaler-style upstream factors must be applied before rounding to fp16: no small entry
    underflows to zero, every entry is within fp16 rounding of the float64 truth."""
    logits, labels = make_inputs(n=64, vocab=4000, dtype=torch.float16, ignore_frac=0.0, scale=4.0)
    x = fresh(logits)
    (gem_loss(x, labels, impl=impl) * 65536.0).backward()
    xt = fresh(logits, torch.float64)
    (gem_loss_reference(xt, labels) * 65536.0).backward()
    assert_close(x.grad, xt.grad, what=f"fp16 grad x 65536 ({impl})", atol=1e-7, rtol=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_computes_no_gradient(impl):
    """Under torch.no_grad() even logits that require grad cost no [N, V] gradient buffer."""
    from benchmarks.measure import peak_memory

    logits, labels = make_inputs(n=64, vocab=3000)
    with torch.no_grad():
        report = peak_memory(gem_loss, logits, labels, impl=impl, device=DEVICE)
    assert report.count_allocs_at_least(64 * 3000 * 4) == 0, report


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_upstream_factor_is_not_rounded_first(impl, reduction):
    """An upstream factor such as 1/3 (gradient accumulation) must scale a bf16 gradient in fp32:
    rounded to bf16 first (0.33398) it would bias every entry by +0.2%, far more than the mean
    of bf16's own unbiased rounding. The mean signed relative error against float64 must be ~0."""
    if impl == "triton" and not ON_CUDA:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 stores (a -0.3% bias of its own)")
    logits, labels = make_inputs(n=64, vocab=2000, dtype=torch.bfloat16, ignore_frac=0.0)
    x = fresh(logits)
    loss = gem_loss(x, labels, reduction=reduction, impl=impl)
    (loss.sum() / 3.0).backward()
    xt = fresh(logits, torch.float64)
    (gem_loss_reference(xt, labels, reduction=reduction).sum() / 3.0).backward()
    ref = xt.grad
    big = ref.abs() > 1e-4
    bias = ((x.grad.double() - ref)[big] / ref[big]).mean().item()
    assert abs(bias) < 5e-4, (
        f"{impl}/{reduction}: mean relative gradient error {bias:.2e} (a bf16-rounded 1/3 gives 1.9e-3)"
    )


@pytest.mark.parametrize("as_tensor", [False, True])
def test_reference_with_zero_num_items_is_zero(as_tensor):
    """The oracle agrees with the API: an all-ignored accumulation window (num_items_in_batch = 0)
    gives 0 for the loss and every statistic, not 0/0 = NaN."""
    logits, labels = make_inputs(n=8, vocab=50, ignore_frac=1.0)
    n = torch.tensor(0) if as_tensor else 0
    loss, ce, metrics = gem_loss_reference(
        logits.double(), labels, num_items_in_batch=n, return_ce=True, return_metrics=True
    )
    for name, value in [("loss", loss), ("ce", ce)] + sorted(metrics.items()):
        assert value.item() == 0.0, f"{name}: {value.item()}"
    loss.backward()
    assert logits.grad is None or torch.count_nonzero(logits.grad) == 0
