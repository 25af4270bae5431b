"""Options are checked and packed once: ``functional.check_options(kind, **options) -> GEMOptions``,
the ``*_with_options`` functions that run a call with them, the modules that build them at
construction, and the one adapter that turns them into the kernels' arguments."""

import dataclasses
import inspect
import re

import pytest
import torch
from helpers import DEVICE, assert_close, fresh, make_inputs

import gem_kernels
from gem_kernels import FusedLinearGEMLoss, GEMLoss, functional, fused_linear_gem_loss, gem_loss
from gem_kernels.functional import (
    check_num_items,
    check_options,
    fused_linear_gem_loss_with_options,
    gem_loss_with_options,
)
from gem_kernels.options import FUSED_ONLY, GEM_ONLY, OPTION_NAMES, GEMOptions
from gem_kernels.reference import gem_loss_reference


def test_option_names_are_the_public_keywords():
    """OPTION_NAMES is what the public functions accept, less the per-call arguments."""
    per_call = {"num_items_in_batch", "process_group", "vocab_start"}
    assert set(OPTION_NAMES["gem"]) == set(gem_loss.__kwdefaults__) - per_call
    assert set(OPTION_NAMES["fused"]) == set(fused_linear_gem_loss.__kwdefaults__) - per_call
    for kind, fn in (("gem", gem_loss), ("fused", fused_linear_gem_loss)):
        defaults = check_options(kind)
        for name in OPTION_NAMES[kind]:
            assert getattr(defaults, name) == fn.__kwdefaults__[name], (kind, name)
    assert set(GEM_ONLY) <= set(OPTION_NAMES["gem"]) and not set(GEM_ONLY) & set(OPTION_NAMES["fused"])
    assert set(FUSED_ONLY) <= set(OPTION_NAMES["fused"]) and not set(FUSED_ONLY) & set(OPTION_NAMES["gem"])


def test_check_options_packs_normalised_values():
    opts = check_options(
        "gem",
        beta=1,
        h="logsigmoid",
        ignore_index=1,
        logit_scale=2,
        softcap=30,
        z_loss_scale=0,
        reduction="sum",
        return_ce=True,
        return_metrics=True,
        inplace_backward=True,
        validate_labels=False,
        impl="torch",
    )
    assert isinstance(opts, GEMOptions)
    assert opts == GEMOptions(
        beta=1.0,
        h="logsigmoid",
        ignore_index=1,
        logit_scale=2.0,
        softcap=30.0,
        z_loss_scale=0.0,
        reduction="sum",
        return_ce=True,
        return_metrics=True,
        inplace_backward=True,
        validate_labels=False,
        impl="torch",
    )
    for name in ("beta", "logit_scale", "softcap", "z_loss_scale"):
        assert type(getattr(opts, name)) is float, name
    fused = check_options("fused", chunk_size=7, low_memory=True)
    assert (fused.chunk_size, fused.low_memory, fused.vocab_start, fused.impl) == (7, True, 0, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fused.beta = 2.0


def test_modules_name_themselves_and_everything_they_accept():
    """The modules refuse an unknown name with their own name and every argument their constructor
    takes (the shard arguments included); num_items_in_batch gets a hint."""
    from gem_kernels import FusedLinearGEMLoss, GEMLoss

    for cls, kind in ((GEMLoss, "gem"), (FusedLinearGEMLoss, "fused")):
        with pytest.raises(TypeError, match=rf"{cls.__name__} got unknown option\(s\) \['bta'\]") as info:
            cls(bta=0.5)
        for allowed in OPTION_NAMES[kind] + ("process_group", "vocab_start"):
            assert f"'{allowed}'" in str(info.value)
        with pytest.raises(TypeError, match="num_items_in_batch is passed to the call"):
            cls(num_items_in_batch=4)


@pytest.mark.parametrize(
    "kind,name",
    [
        ("gem", "chunk_size"),
        ("gem", "low_memory"),
        ("fused", "inplace_backward"),
        ("gem", "num_items_in_batch"),
        ("fused", "process_group"),
        ("gem", "vocab_start"),
        ("fused", "bta"),
    ],
)
def test_unknown_option_names_are_refused_with_the_allowed_ones(kind, name):
    with pytest.raises(TypeError, match=rf"unknown option\(s\) \['{name}'\].*allowed: .*'beta'") as info:
        check_options(kind, **{name: 1})
    for allowed in OPTION_NAMES[kind]:
        assert f"'{allowed}'" in str(info.value)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_options("logits", beta=0.5)


BAD = [
    (dict(beta=0), ValueError, "beta must be a finite number > 0"),
    (dict(beta=float("nan")), ValueError, "beta must be a finite number > 0"),
    (dict(beta=True), ValueError, "beta must be a finite number > 0"),
    (dict(h="tanh"), ValueError, "h must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale must be a finite number > 0"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0"),
    (dict(z_loss_scale=-1e-4), ValueError, "z_loss_scale must be a finite number >= 0"),
    (dict(return_ce=1), TypeError, "return_ce must be a bool"),
    (dict(return_metrics="yes"), TypeError, "return_metrics must be a bool"),
    (dict(validate_labels=0), TypeError, "validate_labels must be a bool"),
]


@pytest.mark.parametrize(
    "kw,exc,msg",
    BAD
    + [
        (dict(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
        (
            dict(inplace_backward=True, impl="reference"),
            ValueError,
            "inplace_backward=True is not available with impl='reference'",
        ),
    ],
)
def test_gem_option_errors_are_the_same_everywhere(kw, exc, msg):
    """One check: check_options, gem_loss and GEMLoss raise the same error, before any kernel."""
    logits, labels = make_inputs(n=4, vocab=11)
    for call in (lambda: check_options("gem", **kw), lambda: gem_loss(logits, labels, **kw), lambda: GEMLoss(**kw)):
        with pytest.raises(exc, match=re.escape(msg)):
            call()


FUSED_BAD = [
    (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
    (dict(chunk_size=2.0), ValueError, "chunk_size must be None or an int"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None or an int"),
    (dict(low_memory=1), TypeError, "low_memory must be a bool"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD + FUSED_BAD)
def test_fused_option_errors_are_the_same_everywhere(kw, exc, msg):
    x, w = torch.randn(4, 3), torch.randn(11, 3)
    labels = torch.randint(0, 11, (4,))
    for call in (
        lambda: check_options("fused", **kw),
        lambda: fused_linear_gem_loss(x, w, labels, **kw),
        lambda: FusedLinearGEMLoss(**kw),
    ):
        with pytest.raises(exc, match=re.escape(msg)):
            call()


def test_num_items_is_checked_per_call():
    check_num_items(None, "sum")
    check_num_items(3, "mean")
    check_num_items(torch.tensor([2.0]), "mean")
    with pytest.raises(ValueError, match="cannot be used with reduction='sum'"):
        check_num_items(3, "sum")
    with pytest.raises(ValueError, match="must be >= 0"):
        check_num_items(torch.tensor(-1), "mean")
    with pytest.raises(ValueError, match="one-element tensor"):
        check_num_items(torch.ones(2), "mean")
    with pytest.raises(ValueError, match="number >= 0"):
        check_num_items(-2, "mean")
    logits, labels = make_inputs(n=4, vocab=11)
    opts = check_options("gem", reduction="none")
    with pytest.raises(ValueError, match="cannot be used with reduction='none'"):
        gem_loss_with_options(logits, labels, opts, num_items_in_batch=3)
    with pytest.raises(TypeError, match="options must be a GEMOptions"):
        gem_loss_with_options(logits, labels, {"beta": 0.5})
    with pytest.raises(TypeError, match="options must be a GEMOptions"):
        fused_linear_gem_loss_with_options(torch.randn(4, 3), torch.randn(11, 3), labels.cpu(), None, dict(beta=0.5))


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_with_options_is_the_public_function(impl):
    """gem_loss = check_options + gem_loss_with_options: the same values and gradients, bit for bit,
    and both match the float64 reference."""
    kw = dict(beta=0.5, h="logsigmoid", softcap=20.0, z_loss_scale=1e-3, return_metrics=True, impl=impl)
    logits, labels = make_inputs(n=9, vocab=257, seed=3)
    a, b = fresh(logits), fresh(logits)
    loss_a, metrics_a = gem_loss(a, labels, num_items_in_batch=5, **kw)
    loss_b, metrics_b = gem_loss_with_options(b, labels, check_options("gem", **kw), num_items_in_batch=5)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b) and torch.equal(a.grad, b.grad)
    assert all(torch.equal(metrics_a[k], metrics_b[k]) for k in metrics_a)
    x = fresh(logits, torch.float64)
    truth = gem_loss_reference(x, labels, num_items_in_batch=5, **{k: v for k, v in kw.items() if k != "impl"})[0]
    truth.backward()
    assert_close(loss_b, truth, what="loss through gem_loss_with_options", dtype=torch.float32)
    assert_close(b.grad, x.grad, what="gradient through gem_loss_with_options", dtype=torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fused_with_options_is_the_public_function(impl):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 8, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(53, 8, generator=g) * 0.5).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 53, (10,), generator=g)
    labels[::3] = -100
    labels = labels.to(DEVICE)
    kw = dict(beta=0.6, reduction="sum", return_ce=True, chunk_size=4, impl=impl)
    xa, wa, xb, wb = fresh(x), fresh(w), fresh(x), fresh(w)
    la, cea = fused_linear_gem_loss(xa, wa, labels, **kw)
    lb, ceb = fused_linear_gem_loss_with_options(xb, wb, labels, None, check_options("fused", **kw))
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(cea, ceb)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(wa.grad, wb.grad)


def test_modules_validate_once_at_construction(monkeypatch):
    """GEMLoss / FusedLinearGEMLoss hold the GEMOptions built at construction; a call does not
    check the options again (check_options is not reached from forward)."""
    mod = GEMLoss(beta=0.5, reduction="sum", impl="torch")
    fmod = FusedLinearGEMLoss(beta=0.5, chunk_size=3, impl="torch")
    assert mod.options == check_options("gem", beta=0.5, reduction="sum", impl="torch")
    assert fmod.options == check_options("fused", beta=0.5, chunk_size=3, impl="torch")
    assert repr(mod) == "GEMLoss(beta=0.5, reduction='sum', impl='torch')"

    def refuse(*args, **kwargs):
        raise AssertionError("options checked again per call")

    for module in (functional, functional.gem, functional.fused_linear, functional._checks):
        monkeypatch.setattr(module, "check_options", refuse, raising=False)
    logits, labels = make_inputs(n=6, vocab=31, device="cpu")
    want = gem_loss_reference(logits.detach().double(), labels, beta=0.5, reduction="sum")
    assert_close(mod(logits, labels), want, what="GEMLoss", dtype=torch.float32)
    x, w = torch.randn(6, 4), torch.randn(31, 4)
    want = gem_loss_reference((x @ w.t()).double(), labels, beta=0.5)
    assert_close(fmod(x, w, labels), want, what="FusedLinearGEMLoss", dtype=torch.float32)


def test_beta_reaches_the_kernels_as_one_gemoptions(monkeypatch):
    """The walk of one option down the layers: the launcher receives the GEMOptions that
    check_options made (impl resolved), and the one adapter turns beta into the kernel's 1/beta."""
    from gem_kernels import ops
    from gem_kernels.ops import _args

    seen = []
    real = ops.gem_forward_grad

    def spy(logits, labels, row_scale, opts, out):
        seen.append(opts)
        return real(logits, labels, row_scale, opts, out)

    monkeypatch.setattr(ops, "gem_forward_grad", spy)
    logits, labels = make_inputs(n=5, vocab=40)
    gem_loss(fresh(logits), labels, beta=0.25, logit_scale=2, impl="triton").backward()
    (opts,) = seen
    assert opts == dataclasses.replace(check_options("gem", beta=0.25, logit_scale=2), impl="triton")
    k = _args.kernel_args(opts)
    assert (k.inv_beta, k.logit_scale, k.SCALE, k.SOFTCAP, k.softcap) == (4.0, 2.0, True, False, 1.0)
    k = _args.kernel_args(check_options("gem", softcap=30.0, logit_scale=2.0, z_loss_scale=1e-4))
    assert (k.SCALE, k.SOFTCAP, k.softcap, k.Z_LOSS, k.NEED_LSE, k.METRICS) == (False, True, 30.0, True, True, False)


@pytest.mark.parametrize(
    "fn",
    [
        check_options,
        gem_loss_with_options,
        fused_linear_gem_loss_with_options,
        check_num_items,
        functional.autocast_linear_inputs,
        functional.autocast_off,
    ],
)
def test_new_public_functions_document_their_arguments(fn):
    doc = inspect.getdoc(fn) or ""
    names = [n for n, p in inspect.signature(fn).parameters.items() if p.kind != p.VAR_KEYWORD]
    missing = [n for n in names if not re.search(rf"\b{re.escape(n)}\b", doc)]
    assert not missing, f"{fn.__name__}: arguments not documented: {missing}"
    assert fn.__name__ in functional.__all__ and gem_kernels.functional is functional
