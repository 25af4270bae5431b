"""GEM in Hugging Face transformers: the logits path (compute_loss_func), the fused path
(apply_gem / GEMTrainer), gradient accumulation and memory. Tiny models built from configs."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import assert_close, only_on  # noqa: E402
from transformers import (  # noqa: E402
    CohereConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

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

VOCAB, HIDDEN = 257, 32
BETA = 0.7


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        # A small cap so that the softcapping visibly changes the loss.
        model = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=3.0, attn_logit_softcapping=50.0))
    with torch.no_grad():  # random init gives near-uniform logits; spread them so GEM is not trivial
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_batch(n: int = 4, seq: int = 12, seed: int = 0):
    """input_ids, attention_mask (right padding of varying length) and labels (-100 on a varying
    prompt and on padding), so micro-batches hold different numbers of target tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    labels = ids.clone()
    for i in range(n):
        pad = (3 * i) % 7
        if pad:
            mask[i, seq - pad :] = 0
            ids[i, seq - pad :] = 0
        labels[i, : 1 + (2 * i) % 5] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def n_targets(labels):
    return int((shift_causal_labels(labels) != -100).sum())


def _reference_step(model, batch, num_items, dtype, opts):
    """Loss and parameter gradients of gem_loss_reference on the full logits of an unpatched copy of
    ``model`` in ``dtype``."""
    m = copy.deepcopy(model).to(dtype)
    if is_gem_applied(m):
        remove_gem(m)
    logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = gem_loss_reference(
        logits, shift_causal_labels(batch["labels"]), beta=BETA, num_items_in_batch=num_items, **opts
    )
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}


def truth(model, batch, num_items=None, **opts):
    """Loss and parameter gradients from gem_loss_reference on the full logits, in float64."""
    return _reference_step(model, batch, num_items, torch.float64, opts)


def same_dtype_baseline(model, batch, num_items=None, **opts):
    """The same computation by plain PyTorch in float32: the error budget for the paths under test."""
    return _reference_step(model, batch, num_items, torch.float32, opts)


def full_batch_ce(model, batch):
    with torch.no_grad():
        m = copy.deepcopy(model).double()
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_causal_labels(batch["labels"]).reshape(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets)


def check_against_truth(model, loss, batch, num_items=None, what=""):
    loss.backward()
    t_loss, t_grads = truth(model, batch, num_items)
    b_loss, b_grads = same_dtype_baseline(model, batch, num_items)
    assert_close(loss.reshape(()), t_loss.reshape(()), what=f"{what} loss", baseline=b_loss, dtype=torch.float32)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{what}: no gradient reached {name}"
        assert_close(p.grad, t_grads[name], what=f"{what} grad {name}", baseline=b_grads[name], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Direct calls: both paths equal the reference on the full logits.


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_logits_path_matches_reference(kind):
    model, batch = tiny_model(kind), make_batch()
    fn = gem_compute_loss_func(beta=BETA, impl="torch")
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    num_items = torch.tensor(n_targets(batch["labels"]) + 5)  # as if part of a bigger accumulated batch
    loss = fn(outputs, batch["labels"], num_items_in_batch=num_items)
    check_against_truth(model, loss, batch, num_items, what=f"{kind} logits path")


@pytest.mark.parametrize(
    "kind,impl",
    [
        ("llama", "torch"),
        ("gemma2", "torch"),
        pytest.param(
            "gemma2",
            "triton",
            marks=only_on("cpu", "the model stays on the CPU here, so impl='triton' needs the interpreter"),
        ),
    ],
)
def test_fused_path_matches_reference(kind, impl):
    model, batch = tiny_model(kind), make_batch(n=2, seq=8)
    apply_gem(model, beta=BETA, impl=impl)
    model.train()
    num_items = torch.tensor(n_targets(batch["labels"]) + 3)
    out = model(**batch, num_items_in_batch=num_items)
    assert "logits" not in out.keys() and out.get("logits") is None
    check_against_truth(model, out.loss, batch, num_items, what=f"{kind} fused path ({impl})")


def test_fused_path_low_memory_matches_reference():
    """low_memory=True reaches the fused path through apply_gem (and GEMTrainer's gem_options)."""
    model, batch = tiny_model("llama"), make_batch(n=2, seq=8)
    apply_gem(model, beta=BETA, impl="torch", low_memory=True)
    model.train()
    out = model(**batch)
    check_against_truth(model, out.loss, batch, None, what="llama fused path (low_memory)")


def test_fused_path_honours_shift_labels_and_return_ce():
    model, batch = tiny_model("llama"), make_batch(n=2, seq=8)
    apply_gem(model, beta=BETA, impl="torch", return_ce=True)
    model.train()
    out = model(**batch)
    shifted = shift_causal_labels(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out_shift = model(**inputs, shift_labels=shifted)
    assert_close(out_shift.loss, out.loss, what="shift_labels vs labels", atol=0, rtol=0)
    assert_close(out.ce, full_batch_ce(model, batch), what="CE logged beside GEM", dtype=torch.float32)


def test_eval_and_generate_unchanged():
    model, batch = tiny_model("gemma2"), make_batch(n=2, seq=8)
    prompt = batch["input_ids"][:1, :5]
    before = model.generate(prompt, max_new_tokens=4, do_sample=False)
    plain_logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    apply_gem(model, beta=BETA, impl="torch")
    model.eval()
    out = model(**batch)
    assert torch.equal(out.logits, plain_logits), "eval with labels must still return the model's logits"
    expected = gem_loss_reference(plain_logits.double(), shift_causal_labels(batch["labels"]), beta=BETA)
    assert_close(out.loss, expected, what="eval GEM loss from logits", dtype=torch.float32)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), before)
    assert model(input_ids=batch["input_ids"]).loss is None
    other = apply_gem(tiny_model("llama"))  # patching another class must not touch this model's forward
    assert model.forward.__wrapped__ is Gemma2ForCausalLM.forward
    assert other.forward.__wrapped__ is LlamaForCausalLM.forward
    remove_gem(model)
    assert not is_gem_applied(model) and "forward" not in model.__dict__


def test_devices_sum_to_full_batch():
    """What average_tokens_across_devices relies on: each device divides its summed loss by the
    global target count, so the device losses add up to the full-batch loss (DDP then averages
    gradients and Trainer multiplies by the number of processes)."""
    model, batch = tiny_model("llama"), make_batch(n=4)
    apply_gem(model, beta=BETA, impl="torch")
    model.train()
    total = n_targets(batch["labels"])
    full = model(**batch, num_items_in_batch=total).loss
    halves = [model(**{k: v[i : i + 2] for k, v in batch.items()}, num_items_in_batch=total).loss for i in (0, 2)]
    assert_close(halves[0] + halves[1], full, what="sum over devices vs full batch", dtype=torch.float32)


def test_logit_transforms_read_from_config():
    assert logit_transform_from_config(LlamaConfig()) == (1.0, None)
    assert logit_transform_from_config(Gemma2Config(final_logit_softcapping=30.0)) == (1.0, 30.0)
    assert logit_transform_from_config(CohereConfig(logit_scale=0.0625)) == (0.0625, None)
    assert logit_transform_from_config(GraniteConfig(logits_scaling=8.0)) == (0.125, None)
    import transformers

    # HyperCLOVA X multiplies by logits_scaling, MiniCPM3 applies it to the hidden states before the
    # head, Falcon-H1 multiplies by lm_head_multiplier; an unknown model type is refused, not guessed.
    cfgs = {
        name: getattr(transformers, name, None) for name in ("HyperCLOVAXConfig", "MiniCPM3Config", "FalconH1Config")
    }
    if cfgs["HyperCLOVAXConfig"] is not None:
        assert logit_transform_from_config(cfgs["HyperCLOVAXConfig"](logits_scaling=4.0)) == (4.0, None)
    if cfgs["MiniCPM3Config"] is not None:
        cfg = cfgs["MiniCPM3Config"]()  # logits_scaling is derived (hidden_size / dim_model_base) here
        assert cfg.logits_scaling != 1.0 and logit_transform_from_config(cfg) == (1.0, None)
    if cfgs["FalconH1Config"] is not None:
        assert logit_transform_from_config(cfgs["FalconH1Config"](lm_head_multiplier=4.0)) == (4.0, None)
    unknown = LlamaConfig()
    unknown.logits_scaling = 3.0
    with pytest.raises(ValueError, match="pass logit_scale"):
        logit_transform_from_config(unknown)
    model = tiny_model("llama")
    model.config.logits_scaling = 3.0
    apply_gem(model, beta=BETA, logit_scale=1 / 3.0)  # an explicit value is accepted instead


def test_apply_gem_refuses_encoder_decoder_models():
    model = tiny_model("llama")
    model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="causal LMs"):
        apply_gem(model, beta=BETA)


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="beta"):
        apply_gem(tiny_model("llama"), beta=0.0)
    with pytest.raises(TypeError, match="unknown GEM option"):
        gem_compute_loss_func(bta=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        apply_gem(tiny_model("llama"), chunk_size=0)
    with pytest.raises(TypeError, match="low_memory must be a bool"):
        apply_gem(tiny_model("llama"), low_memory="yes")


# ----------------------------------------------------------------------------------------------
# Trainer: a few steps, gradient accumulation exact against one big batch.


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainer_args(tmp_path, per_device, accum, steps=1, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **kw,
    )


def make_trainer(path, model, args, dataset, impl="torch"):
    if path == "logits":
        return Trainer(
            model=model, args=args, train_dataset=dataset, compute_loss_func=gem_compute_loss_func(beta=BETA, impl=impl)
        )
    if path == "apply_gem":
        return Trainer(model=apply_gem(model, beta=BETA, impl=impl), args=args, train_dataset=dataset)
    return GEMTrainer(model=model, args=args, train_dataset=dataset, gem_options=dict(beta=BETA, impl=impl))


@pytest.mark.parametrize("path", ["logits", "apply_gem", "gem_trainer"])
@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_step_equals_one_big_batch(tmp_path, path, accum):
    """One optimizer step of plain SGD (lr 1) with accumulation k over micro-batches of 4/k rows
    moves the parameters by exactly -grad of the GEM loss of the whole 4-row batch."""
    model, batch = tiny_model("llama"), make_batch(n=4)
    model_before = copy.deepcopy(model)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    t_loss, t_grads = truth(model, batch)
    b_loss, b_grads = same_dtype_baseline(model, batch)
    trainer = make_trainer(path, model, trainer_args(tmp_path, 4 // accum, accum), ListDataset(batch))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert_close(
        torch.tensor(logged[0]),
        t_loss.float(),
        what=f"{path} k={accum} logged loss",
        baseline=b_loss,
        dtype=torch.float32,
        atol=1e-5,
    )
    for name, p in model.named_parameters():
        assert_close(
            start[name] - p.detach(),
            t_grads[name],
            what=f"{path} k={accum} step of {name}",
            baseline=b_grads[name],
            dtype=torch.float32,
        )
    if path == "gem_trainer":  # the CE logged beside GEM is the big batch's mean CE
        assert_close(
            torch.tensor(trainer.state.log_history[0]["ce"]),
            full_batch_ce(model_before, batch),
            what=f"k={accum} logged CE",
            dtype=torch.float32,
            atol=1e-5,
        )


@only_on("cpu", "trainer_args keeps the model on the CPU (use_cpu=True), where impl='triton' needs the interpreter")
def test_gem_trainer_triton_end_to_end(tmp_path):
    """A few GEMTrainer steps on Gemma-2 (softcapping) with the Triton kernels (interpreter): the
    loss is finite and the evaluation loss equals GEM on the logits."""
    model, batch = tiny_model("gemma2"), make_batch(n=4, seq=8)
    args = trainer_args(tmp_path, 2, 2, steps=2, per_device_eval_batch_size=4)
    args.learning_rate = 1e-2
    trainer = GEMTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(batch),
        eval_dataset=ListDataset(batch),
        gem_options=dict(beta=BETA, impl="triton"),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = gem_loss_reference(logits.double(), shift_causal_labels(batch["labels"]), beta=BETA)
    assert abs(metrics["eval_loss"] - expected.item()) < 1e-4


def test_trainer_setup(tmp_path):
    model, batch = tiny_model("llama"), make_batch(n=2)
    with pytest.raises(ValueError, match="compute_loss_func"):  # only gem_compute_loss_func (the logits path)
        GEMTrainer(
            model=model,
            args=trainer_args(tmp_path, 2, 1),
            train_dataset=ListDataset(batch),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )
    with pytest.raises(ValueError, match="beta"):
        GEMTrainer(model=model, args=trainer_args(tmp_path, 2, 1), gem_options=dict(beta=-1.0))
    trainer = GEMTrainer(
        model_init=lambda: tiny_model("llama"), args=trainer_args(tmp_path, 2, 1), train_dataset=ListDataset(batch)
    )
    assert is_gem_applied(trainer.model) and trainer.model_accepts_loss_kwargs


@pytest.mark.parametrize("path", ["gem_trainer", "gem_trainer_logits"])
def test_gem_trainer_checks_its_options_once(tmp_path, monkeypatch, path):
    """A GEM trainer validates its options once, into one GEMOptions, when it is built; its training
    and evaluation steps run the *_with_options functions with options derived from it and never
    the keyword functions, which would validate them again."""
    import gem_kernels.functional.fused_linear as fused_module
    import gem_kernels.functional.gem as gem_module
    from gem_kernels.integrations import _options

    checked = []
    check = _options.check_options
    monkeypatch.setattr(_options, "check_options", lambda kind, **o: checked.append(kind) or check(kind, **o))

    def again(*args, **kwargs):
        raise AssertionError("options validated again during a step")

    monkeypatch.setattr(fused_module, "check_options", again)
    monkeypatch.setattr(gem_module, "check_options", again)
    model, batch = tiny_model("llama"), make_batch(n=4)
    args = trainer_args(tmp_path, 2, 1, per_device_eval_batch_size=4)
    if path == "gem_trainer":
        trainer = GEMTrainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            eval_dataset=ListDataset(batch),
            gem_options=dict(beta=BETA, impl="torch"),
        )
    else:
        trainer = GEMTrainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            eval_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch"),
        )
    # once per option set: the trainer's gem_options ("fused"), and the callable's ("gem", logits path)
    assert sorted(checked) == (["fused"] if path == "gem_trainer" else ["fused", "gem"])
    trainer.train()
    metrics = trainer.evaluate()
    assert len(checked) == 1 + (path != "gem_trainer") and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert "ce" in trainer.state.log_history[0] and "entropy" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------------------------
# Memory: the fused training step never holds a [batch, seq, V] tensor.


def test_fused_training_step_holds_no_logits():
    measure = pytest.importorskip("benchmarks.measure")
    n, seq = 4, 64
    batch = make_batch(n=n, seq=seq)
    logits_bytes = n * seq * VOCAB * 4

    def step(model, fused):
        model.train()
        if fused:
            loss = model(**batch).loss
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = gem_compute_loss_func(beta=BETA, impl="torch")(out, batch["labels"])
        loss.backward()
        return loss.detach()

    plain = measure.peak_memory(step, tiny_model("llama"), False)
    fused_model = apply_gem(tiny_model("llama"), beta=BETA, impl="torch", chunk_size=32)
    fused = measure.peak_memory(step, fused_model, True)
    # The logits path does allocate the logits (so this measurement can see them) ...
    assert plain.largest_alloc_bytes >= logits_bytes, plain.mib()
    # ... and the fused path allocates nothing that large.
    assert fused.largest_alloc_bytes < logits_bytes // 2, fused.mib()
    assert fused.peak_bytes < plain.peak_bytes, (fused.mib(), plain.mib())


def test_import_gem_kernels_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, gem_kernels, gem_kernels.integrations; print('transformers' in sys.modules, 'trl' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# Two real processes (DDP over gloo on CPU): average_tokens_across_devices with GEM. Skipped with
# GEM_SKIP_MULTIPROCESS=1, since starting two interpreters takes longer than the rest of this file.


def _ddp_worker(out_dir: str, path: str):
    """Run by torchrun: one SGD step of a 4-row batch split over the processes."""
    model, batch = tiny_model("llama"), make_batch(n=4)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    args = trainer_args(out_dir, 1, 2, average_tokens_across_devices=True, train_sampling_strategy="sequential")
    trainer = make_trainer(path, model, args, ListDataset(batch))
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save(
            {
                "world": trainer.args.world_size,
                "log": trainer.state.log_history[0],
                "steps": {k: start[k] - p.detach() for k, p in model.named_parameters()},
            },
            os.path.join(out_dir, f"{path}.pt"),
        )


def _run_two_processes(tmp_path, mode):
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free loopback port, so runs never collide on a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            os.path.abspath(__file__),
            str(tmp_path),
            mode,
        ],
        check=True,
        env=env,
        cwd=root,
    )
    return torch.load(tmp_path / f"{mode}.pt")


multiprocess = pytest.mark.skipif(
    os.environ.get("GEM_SKIP_MULTIPROCESS") == "1", reason="GEM_SKIP_MULTIPROCESS=1 (these tests start 2 processes)"
)


@multiprocess
@pytest.mark.parametrize("path", ["logits", "gem_trainer"])
def test_two_process_ddp_step_equals_one_big_batch(tmp_path, path):
    result = _run_two_processes(tmp_path, path)
    assert result["world"] == 2
    model, batch = tiny_model("llama"), make_batch(n=4)
    t_loss, t_grads = truth(model, batch)
    b_loss, b_grads = same_dtype_baseline(model, batch)
    assert_close(
        torch.tensor(result["log"]["loss"]),
        t_loss.float(),
        what=f"2-process {path} logged loss",
        baseline=b_loss,
        dtype=torch.float32,
        atol=1e-5,
    )
    if path == "gem_trainer":
        assert_close(
            torch.tensor(result["log"]["ce"]),
            full_batch_ce(model, batch),
            what="2-process logged CE",
            dtype=torch.float32,
            atol=1e-5,
        )
        # entropy and accuracy: per micro-batch token means over both processes; with sequential
        # sampling micro-batch k holds rows 2k (process 0) and 2k + 1 (process 1)
        from test_metrics_integrations import expected_logs

        want_ent, want_acc = expected_logs(model, batch, 2)
        assert_close(torch.tensor(result["log"]["entropy"]), want_ent, what="2-process logged entropy", atol=1e-5)
        assert_close(torch.tensor(result["log"]["mean_token_accuracy"]), want_acc, what="2-process accuracy", atol=1e-6)
    for name, step in result["steps"].items():
        assert_close(
            step, t_grads[name], what=f"2-process {path} step of {name}", baseline=b_grads[name], dtype=torch.float32
        )


@multiprocess
@pytest.mark.parametrize("mode", ["fsdp2-root", "fsdp2-head"])
def test_two_process_fsdp2_fused_path_matches_reference(tmp_path, mode):
    """The fused path under FSDP2 (CPU, gloo): the loss runs inside the LM head's call, where
    fully_shard has gathered the weight, also when the head is its own resharded unit."""
    result = _run_two_processes(tmp_path, mode)
    assert result["world"] == 2
    model, batch = tiny_model("llama"), make_batch(n=4)
    num_items = n_targets(batch["labels"])
    t_loss, t_grads = truth(model, batch, num_items)
    b_loss, b_grads = same_dtype_baseline(model, batch, num_items)
    assert_close(result["loss"], t_loss.float(), what=f"{mode} loss", baseline=b_loss, dtype=torch.float32)
    for name, g in result["grads"].items():
        assert_close(g, t_grads[name], what=f"{mode} grad {name}", baseline=b_grads[name], dtype=torch.float32)


def _fsdp2_worker(out_dir: str, mode: str):
    """Run by torchrun: FSDP2 (fully_shard) over the processes, each taking half of a 4-row batch;
    ``mode`` "fsdp2-head" also shards the LM head as its own unit (resharded after forward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, batch = tiny_model("llama"), make_batch(n=4)
    apply_gem(model, beta=BETA, impl="torch")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if mode == "fsdp2-head":
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.train()
    rows = 4 // world
    local = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
    out = model(**local, num_items_in_batch=n_targets(batch["labels"]))
    (out.loss * world).backward()  # FSDP averages gradients over the processes, as DDP does
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    if rank == 0:
        torch.save({"world": world, "loss": loss, "grads": grads}, os.path.join(out_dir, f"{mode}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if sys.argv[2].startswith("fsdp2"):
        _fsdp2_worker(sys.argv[1], sys.argv[2])
    else:
        _ddp_worker(sys.argv[1], sys.argv[2])
    # The work is done and saved: skip interpreter teardown, where gloo's threads were seen to abort
    # ("terminate called without an active exception") now and then, failing a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
