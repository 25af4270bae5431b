"""The ways the trainer integrations could train something other than GEM without a word: logit
transforms between the head and the logits, a trainer that takes the labels away, an ignore_index
other than -100, serialisation, another integration replacing GEM's forward. Each test feeds an
input that would do so and holds the right value or the clear error. Tiny models built from configs
(V = 257, H = 32); no downloads."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import assert_close  # noqa: E402
from test_integrations_transformers import (  # noqa: E402
    BETA,
    HIDDEN,
    VOCAB,
    ListDataset,
    make_batch,
    tiny_model,
    trainer_args,
)
from transformers import LlamaForCausalLM, Trainer  # noqa: E402

from gem_kernels.integrations._logit_transforms import check_probe, probe_values  # noqa: E402
from gem_kernels.integrations.transformers import (  # noqa: E402
    GEMTrainer,
    apply_gem,
    gem_compute_loss_func,
    is_gem_applied,
    logit_transform_from_config,
    remove_gem,
    shift_causal_labels,
)
from gem_kernels.reference import gem_loss_reference  # noqa: E402


def reference_step(model, loss_fn, dtype):
    """``loss_fn(m)`` on an unpatched copy ``m`` of ``model`` in ``dtype``: loss and parameter grads."""
    m = copy.deepcopy(model)
    remove_gem(m)
    m = m.to(dtype)
    loss = loss_fn(m)
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}


def assert_matches_reference(got_loss, got_grads, model, loss_fn, what):
    """``got_*`` against ``loss_fn`` in float64, within 2x the float32 PyTorch error of the same."""
    t_loss, t_grads = reference_step(model, loss_fn, torch.float64)
    b_loss, b_grads = reference_step(model, loss_fn, torch.float32)
    assert_close(got_loss.reshape(()), t_loss.reshape(()), what=f"{what} loss", baseline=b_loss, dtype=torch.float32)
    assert set(got_grads) == set(t_grads), (what, sorted(set(got_grads) ^ set(t_grads)))
    for name, g in got_grads.items():
        assert_close(g, t_grads[name], what=f"{what} grad {name}", baseline=b_grads[name], dtype=torch.float32)


def own_logits_gem(batch, ignore_index=-100, num_items=None):
    """GEM of the model's own logits (whatever its forward does after the head)."""
    targets = shift_causal_labels(batch["labels"], ignore_index)
    return lambda m: gem_loss_reference(
        m(input_ids=batch["input_ids"]).logits,
        targets,
        beta=BETA,
        ignore_index=ignore_index,
        num_items_in_batch=num_items,
    )


def fused_step(model, batch):
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# 1. Logit transforms between the head and the logits.


def capped_recurrent_model(kind: str):
    """Tiny RecurrentGemma / xLSTM with their output softcap set to 3 and head weights spread."""
    torch.manual_seed(0)
    if kind == "recurrent_gemma":
        from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

        cfg = RecurrentGemmaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            lru_width=HIDDEN,
            attention_window_size=16,
            block_types=["recurrent", "attention"],
            logits_soft_cap=3.0,
            pad_token_id=0,
        )
        model = RecurrentGemmaForCausalLM(cfg)
    else:
        from transformers import xLSTMConfig, xLSTMForCausalLM

        # (its native kernels need the q/k width, rounded up to 64, equal to hidden_size)
        cfg = xLSTMConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_heads=2,
            qk_dim_factor=1.0,
            num_blocks=2,
            chunk_size=4,
            output_logit_soft_cap=3.0,
            mode="train",
            pad_token_id=0,
        )
        model = xLSTMForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("kind", ["recurrent_gemma", "xlstm"])
def test_recurrent_softcaps_are_applied(kind):
    """RecurrentGemma's logits_soft_cap and xLSTM's output_logit_soft_cap (both default 30) were not
    read: the fused loss was GEM of uncapped logits (4.730 vs 2.223 and 3.757 vs 2.011 at cap 3)."""
    model = capped_recurrent_model(kind)
    assert logit_transform_from_config(model.config) == (1.0, 3.0)
    assert logit_transform_from_config(type(model.config)()) == (1.0, 30.0)  # the defaults
    batch = make_batch(n=2, seq=8)
    batch.pop("attention_mask")
    if kind == "xlstm":
        # transformers 5.24's native mLSTM backward fails on CPU by itself ("modified by an inplace
        # operation"), with or without GEM: train the head only, whose gradient the cap changes.
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("lm_head"))
    before = copy.deepcopy(model)  # (RecurrentGemma keeps non-leaf state after a forward: copy it first)
    apply_gem(model, beta=BETA, impl="torch")
    loss, grads = fused_step(model, batch)
    assert_matches_reference(loss, grads, before, own_logits_gem(batch), what=f"{kind} cap 3")


def test_unknown_config_transform_is_refused():
    model = tiny_model("llama")
    model.config.output_logits_cap = 30.0  # a key apply_gem does not know
    with pytest.raises(ValueError, match=r"output_logits_cap=30.0.*pass logit_scale=.*softcap="):
        apply_gem(model, beta=BETA)
    model.config.attn_logit_softcapping = 50.0  # attention caps are not about the output logits
    model.config.output_logits_cap = 1.0  # a neutral value is no transform
    apply_gem(model, beta=BETA)


@pytest.mark.parametrize(
    "key,value,option",
    [
        ("logit_scale", float("nan"), "logit_scale"),
        ("logit_scale", -2.0, "logit_scale"),
        ("final_logit_softcapping", float("inf"), "softcap"),
    ],
)
def test_bad_config_transform_is_refused_by_name(key, value, option):
    """A config's logit_scale / softcap goes through the same checks as an explicit option, before
    any kernel runs: a NaN scale would otherwise give a NaN loss with no named error."""
    model = tiny_model("llama")
    setattr(model.config, key, value)
    with pytest.raises(ValueError, match=rf"LlamaForCausalLM's config .*{option} must be"):
        apply_gem(model, beta=BETA)
    apply_gem(model, beta=BETA, **{option: 2.0})  # an explicit value overrides the config's


class ScaledLlama(LlamaForCausalLM):
    """A model that halves its logits after the head, with no config key saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_first_step_checks_the_models_own_transform():
    """The check that needs no list of names: on the first training step the head hands the model
    probe values and the model's own transform of them must be the one the fused path applies."""
    batch = make_batch(n=2, seq=8)
    torch.manual_seed(0)
    model = ScaledLlama(tiny_model("llama").config)
    apply_gem(model, beta=BETA, impl="torch")
    model.train()
    with pytest.raises(ValueError, match=r"ScaledLlama transforms its head output.*64 -> 32 \(expected 64\)"):
        model(**batch)
    # Given the transform, the fused path is exact, and the check does not run again.
    apply_gem(model, beta=BETA, impl="torch", logit_scale=0.5)
    loss, grads = fused_step(model, batch)
    assert_matches_reference(loss, grads, model, own_logits_gem(batch), what="explicit logit_scale=0.5")
    # A wrong explicit value is caught the same way (Llama has no cap).
    wrong = apply_gem(tiny_model("llama"), beta=BETA, impl="torch", softcap=30.0).train()
    with pytest.raises(ValueError, match=r"softcap=30.0.*1024 -> 1024"):
        wrong(**batch)


class SlightlyScaledLlama(LlamaForCausalLM):
    """Scales its logits by 1.02 after the head: within bf16's rounding of the old bf16 probe."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.02
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_first_step_check_catches_a_small_scale_in_half_precision(dtype):
    """The probe is float32 whatever the head's dtype, so a 2% scale is no rounding error."""
    batch = make_batch(n=2, seq=8)
    torch.manual_seed(0)
    model = apply_gem(SlightlyScaledLlama(tiny_model("llama").config).to(dtype), beta=BETA, impl="torch").train()
    with pytest.raises(ValueError, match=r"SlightlyScaledLlama transforms its head output.*1024 -> 1044.48"):
        model(**batch)
    # Given the scale, the check passes and the step runs.
    apply_gem(model, beta=BETA, impl="torch", logit_scale=1.02)
    assert torch.isfinite(model(**batch).loss)


def test_check_probe_tolerance():
    """float32 logits: float32's tolerance; logits the model itself rounded to bf16 / fp16: that
    rounding is allowed (a correct softcap passes) and a 2% scale is still caught."""
    raw = probe_values((2, 3), torch.float32, "cpu")
    assert raw.dtype == torch.float32 and check_probe(raw * 1.0, 1.0, None, "M")
    with pytest.raises(ValueError, match="1 -> 1.0001"):
        check_probe(raw * 1.0001, 1.0, None, "M")
    for dt in (torch.bfloat16, torch.float16):
        assert check_probe((30 * torch.tanh(raw / 30)).to(dt), 1.0, 30.0, "M")
        assert check_probe((raw * 0.7).to(dt), 0.7, None, "M")
        with pytest.raises(ValueError, match="transforms its head output"):
            check_probe((raw * 1.02).to(dt), 1.0, None, "M")


@pytest.mark.parametrize("cls,dtype", [(ScaledLlama, torch.float32), (SlightlyScaledLlama, torch.bfloat16)])
def test_first_step_check_under_torch_compile(cls, dtype):
    """Traced by dynamo, the same check is a device-side assert: no graph break, still an error."""
    batch = make_batch(n=2, seq=8)
    torch.manual_seed(0)
    model = apply_gem(cls(tiny_model("llama").config).to(dtype), beta=BETA, impl="torch").train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=f"{cls.__name__} transforms its head output"):
        compiled(**batch)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# 2. A trainer that takes the labels away.


def test_plain_trainer_label_smoothing_is_refused(tmp_path):
    batch = make_batch(n=4)
    model = apply_gem(tiny_model("llama"), beta=BETA, impl="torch")
    args = trainer_args(tmp_path, 4, 1, label_smoothing_factor=0.1)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(batch))
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"without labels.*label_smoothing_factor=0.1"):
        trainer.train()
    assert all(torch.equal(start[k], p) for k, p in model.named_parameters()), "no step may be taken"
    with pytest.raises(ValueError, match="label_smoothing_factor"):  # GEMTrainer refuses it up front
        GEMTrainer(model=tiny_model("llama"), args=args, train_dataset=ListDataset(batch))
    # A compute_loss_func that is not GEM on an apply_gem model: the same refusal.
    ce = lambda outputs, labels, num_items_in_batch=None: outputs.logits.float().logsumexp(-1).mean()  # noqa: E731
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, 4, 1), train_dataset=ListDataset(batch), compute_loss_func=ce
    )
    with pytest.raises(ValueError, match="compute_loss_func"):
        trainer.train()
    # Outside a Trainer, a training-mode call without labels is plain inference, as before.
    assert model(input_ids=batch["input_ids"]).logits.shape[-1] == VOCAB


# ----------------------------------------------------------------------------------------------
# 3. ignore_index other than -100.


def zero_labelled_batch():
    """4 sequences of 12 tokens whose prompt and padding are labelled 0 instead of -100 (a dataset
    built for ignore_index=0)."""
    batch = make_batch(n=4, seq=12)
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 0)
    return batch


@pytest.mark.parametrize("accum", [1, 2])
def test_gem_trainer_counts_with_its_ignore_index(tmp_path, accum):
    batch = zero_labelled_batch()
    assert int((batch["labels"][:, 1:] != -100).sum()) == 44  # what Trainer's hard-coded count gives
    assert int((batch["labels"][:, 1:] != 0).sum()) == 26  # the targets GEM sums over
    model = tiny_model("llama")
    before = copy.deepcopy(model)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer = GEMTrainer(
        model=model,
        args=trainer_args(tmp_path, 4 // accum, accum),
        train_dataset=ListDataset(batch),
        gem_options=dict(beta=BETA, impl="torch", ignore_index=0),
    )
    trainer.train()
    logged = torch.tensor(trainer.state.log_history[0]["loss"])
    steps = {k: start[k] - p.detach() for k, p in model.named_parameters()}
    assert_matches_reference(
        logged, steps, before, own_logits_gem_masked(batch, 0), what=f"GEMTrainer ignore_index=0 k={accum}"
    )


def own_logits_gem_masked(batch, ignore_index):
    targets = shift_causal_labels(batch["labels"], ignore_index)
    return lambda m: gem_loss_reference(
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        targets,
        beta=BETA,
        ignore_index=ignore_index,
    )


@pytest.mark.parametrize("route", ["apply_gem", "compute_loss_func"])
def test_plain_trainer_refuses_a_foreign_ignore_index(tmp_path, route):
    batch = zero_labelled_batch()
    model = tiny_model("llama")
    if route == "apply_gem":
        trainer = Trainer(
            model=apply_gem(model, beta=BETA, impl="torch", ignore_index=0),
            args=trainer_args(tmp_path, 4, 1),
            train_dataset=ListDataset(batch),
        )
    else:
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path, 4, 1),
            train_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch", ignore_index=0),
        )
    with pytest.raises(ValueError, match=r"ignore_index=0.*labels != -100.*GEMTrainer"):
        trainer.train()
    # Outside a Trainer the caller's own count is used (here: this batch's 26 targets).
    direct = apply_gem(tiny_model("llama"), beta=BETA, impl="torch", ignore_index=0).train()
    loss = direct(**batch, num_items_in_batch=26).loss
    expected = own_logits_gem_masked(batch, 0)(copy.deepcopy(direct).double())
    assert_close(loss, expected, what="direct call, ignore_index=0", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# 4. Serialisation keeps the patch.


def _gem_loss_of(model, batch):
    model.train()
    with torch.no_grad():
        return model(**batch).loss


def test_patched_model_round_trips(tmp_path):
    batch = make_batch(n=2, seq=8)
    model = apply_gem(tiny_model("llama"), beta=BETA, impl="torch")
    expected = _gem_loss_of(model, batch)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    copies = {
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(path, weights_only=False),
        "deepcopy": copy.deepcopy(model),
    }
    for how, other in copies.items():
        assert is_gem_applied(other), how
        assert other.forward._gem_target is other, f"{how}: the forward must call the copy, not the original"
        assert torch.equal(_gem_loss_of(other, batch), expected), f"{how}: not GEM after the round trip"
    plain = remove_gem(copies["pickle"])
    ce = _gem_loss_of(plain, batch)
    assert not is_gem_applied(plain) and abs(ce - expected) > 1.0, "CE and GEM differ widely here"


def _spawn_worker(payload, path):
    model, batch = pickle.loads(payload)  # as a spawn-mode worker receives its arguments
    torch.save((is_gem_applied(model), _gem_loss_of(model, batch)), path)


@pytest.mark.skipif(__import__("os").environ.get("GEM_SKIP_MULTIPROCESS") == "1", reason="GEM_SKIP_MULTIPROCESS=1")
def test_patched_model_in_a_spawned_worker(tmp_path):
    import multiprocessing as mp

    batch = make_batch(n=2, seq=8)
    model = apply_gem(tiny_model("llama"), beta=BETA, impl="torch")
    proc = mp.get_context("spawn").Process(
        target=_spawn_worker, args=(pickle.dumps((model, batch)), str(tmp_path / "out.pt"))
    )
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0, f"spawned worker failed (exit code {proc.exitcode})"
    applied, loss = torch.load(tmp_path / "out.pt")
    assert applied and torch.equal(loss, _gem_loss_of(model, batch))


# ----------------------------------------------------------------------------------------------
# 5. Another integration replacing GEM's forward.


def test_use_liger_kernel_is_refused(tmp_path):
    batch = make_batch(n=4)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        GEMTrainer(
            model=tiny_model("llama"),
            args=trainer_args(tmp_path, 4, 1, use_liger_kernel=True),
            train_dataset=ListDataset(batch),
        )


def test_is_gem_applied_is_truthful_when_liger_replaces_the_forward():
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.monkey_patch import apply_liger_kernel_to_llama

    model = apply_gem(tiny_model("llama"), beta=BETA)
    assert is_gem_applied(model)
    # What Trainer(use_liger_kernel=True) does in train(); only the forward (no module-wide patches).
    apply_liger_kernel_to_llama(rope=False, rms_norm=False, swiglu=False, model=model)
    assert not is_gem_applied(model)
    apply_gem(model, beta=BETA)  # applying GEM last works again
    assert is_gem_applied(model)


def test_gem_trainer_guards_every_step(tmp_path):
    """A forward installed after GEMTrainer patched the model (as Liger does inside train()) trains
    CE: the guard raises on that step instead."""
    batch = make_batch(n=4)
    trainer = GEMTrainer(
        model=tiny_model("llama"),
        args=trainer_args(tmp_path, 2, 2, steps=1),
        train_dataset=ListDataset(batch),
        gem_options=dict(beta=BETA, impl="torch"),
    )
    model = trainer.model
    model.forward = types.MethodType(LlamaForCausalLM.forward, model)
    assert not is_gem_applied(model)
    with pytest.raises(RuntimeError, match=r"did not come from GEM.*is_gem_applied: False"):
        trainer.train()
