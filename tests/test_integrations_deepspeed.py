"""GEM's fused path under DeepSpeed ZeRO-1/2/3 on two CPU processes over gloo.

One ``torchrun --nproc_per_node 2`` launch runs every configuration of ``CASES`` in turn (the
interpreters, DeepSpeed's import and its shared-memory op, built once into ~/.cache/torch_extensions,
are shared); each configuration trains 2 SGD steps of the same 4-row global batch and saves the full
fp32 parameters. Each test compares one configuration with the float64 trajectory of a single
process on the whole batch, allowing 2x (3x in bf16) the error of the same two steps done by plain
single-process PyTorch in the same precision, plus an atol (1e-7, bf16 1e-5) far below every
parameter's movement. Skipped when deepspeed is not importable, or with
GEM_SKIP_MULTIPROCESS=1.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import assert_close  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from gem_kernels.integrations.transformers import apply_gem, shift_causal_labels  # noqa: E402
from gem_kernels.reference import gem_loss_reference  # noqa: E402

VOCAB, HIDDEN, BETA, LR, STEPS, WORLD = 257, 32, 0.7, 0.1, 2, 2

# name: (route, ZeRO stage, tied head, "zero_init" (built by from_pretrained under deepspeed.zero.Init)
# or "normal", offload_param to CPU, gradient accumulation, dtype). ZeRO-3 runs with
# stage3_param_persistence_threshold 0: by default DeepSpeed never releases parameters under 1e5
# elements, which would be every parameter of these tiny models (a real LM head is far larger);
# "-persist" runs with DeepSpeed's default instead.
CASES = {
    "z3-apply_gem-untied-persist": ("apply_gem", 3, False, "normal", False, 1, "fp32"),
    "z3-apply_gem-untied": ("apply_gem", 3, False, "normal", False, 1, "fp32"),
    "z3-apply_gem-tied-ga2": ("apply_gem", 3, True, "normal", False, 2, "fp32"),
    "z3-apply_gem-untied-init-ga2": ("apply_gem", 3, False, "zero_init", False, 2, "fp32"),
    "z3-apply_gem-tied-init-offload": ("apply_gem", 3, True, "zero_init", True, 1, "fp32"),
    "z3-apply_gem-untied-bf16-ga2": ("apply_gem", 3, False, "normal", False, 2, "bf16"),
    "z3-gem_trainer-untied-init-ga2": ("gem_trainer", 3, False, "zero_init", False, 2, "fp32"),
    "z3-gem_trainer-tied-offload-bf16": ("gem_trainer", 3, True, "normal", True, 1, "bf16"),
    "z3-gem_sft_trainer-untied-init-offload": ("gem_sft_trainer", 3, False, "zero_init", True, 1, "fp32"),
    "z3-gem_sft_trainer-tied-init-ga2-bf16": ("gem_sft_trainer", 3, True, "zero_init", False, 2, "bf16"),
    "z2-apply_gem-untied-ga2": ("apply_gem", 2, False, "normal", False, 2, "fp32"),
    "z2-gem_trainer-tied-bf16": ("gem_trainer", 2, True, "normal", False, 1, "bf16"),
    "z1-apply_gem-tied": ("apply_gem", 1, True, "normal", False, 1, "fp32"),
    "z1-gem_sft_trainer-untied-ga2": ("gem_sft_trainer", 1, False, "normal", False, 2, "fp32"),
}


def build_model(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread the near-uniform initial logits so GEM is not trivial
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def sft_rows():
    """4 pre-tokenized rows of different lengths, prompts (completion_mask 0) of different lengths."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(4):
        length = 9 + 2 * i
        rows.append(
            {
                "input_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist(),
                "completion_mask": [0] * (2 + i) + [1] * (length - 2 - i),
            }
        )
    return rows


def global_batch():
    """The 4-row batch all routes train on (right padding, -100 on prompts and padding): SFTTrainer
    builds it from sft_rows, the other routes get it directly."""
    rows = sft_rows()
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        keep = torch.tensor(r["completion_mask"], dtype=torch.bool)
        labels[i, :n] = torch.where(keep, ids[i, :n], torch.full((n,), -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_trajectory(model, batch, compute_dtype, master_dtype, start_dtype=None):
    """Parameters after STEPS SGD steps (lr LR) on the whole batch in one process: forward and
    backward in ``compute_dtype`` (gem_loss_reference on the full logits), master weights in
    ``master_dtype`` starting from the parameters rounded to ``start_dtype``."""
    m = copy.deepcopy(model).to(compute_dtype)
    start_dtype = start_dtype or master_dtype
    master = {k: p.detach().to(start_dtype).to(master_dtype) for k, p in model.named_parameters()}
    targets = shift_causal_labels(batch["labels"])
    for _ in range(STEPS):
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(master[k])
        m.zero_grad(set_to_none=True)
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        gem_loss_reference(logits, targets, beta=BETA).backward()
        for k, p in m.named_parameters():
            master[k] = master[k] - LR * p.grad.to(master_dtype)
    return master


multiprocess = pytest.mark.skipif(
    os.environ.get("GEM_SKIP_MULTIPROCESS") == "1", reason="GEM_SKIP_MULTIPROCESS=1 (these tests start 2 processes)"
)


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    """One two-process launch running every case; returns {case: saved result or None}."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[dev]')")
    import socket
    import subprocess

    out = tmp_path_factory.mktemp("deepspeed")
    for tied in (False, True):  # the checkpoints from_pretrained loads (under zero.Init when configured)
        build_model(tied).save_pretrained(out / f"model-{'tied' if tied else 'untied'}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A CPU test on any machine: DeepSpeed's CPU accelerator and gloo even where CUDA is present.
    env = {
        **os.environ,
        "PYTHONPATH": root,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(WORLD),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            os.path.abspath(__file__),
            str(out),
            json.dumps(sorted(CASES)),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    results = {name: (torch.load(out / f"{name}.pt") if (out / f"{name}.pt").exists() else None) for name in CASES}
    return results, proc.returncode, (proc.stdout + proc.stderr)[-6000:]


@multiprocess
@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspeed_two_process_matches_single_process(deepspeed_results, case):
    results, rc, log = deepspeed_results
    result = results[case]
    assert result is not None, f"{case}: no result (launcher exit code {rc}); output tail:\n{log}"
    if "error" in result:
        pytest.fail(f"{case} raised in the worker:\n{result['error']}")
    route, stage, tied, init, offload, accum, dtype = CASES[case]
    assert result["world"] == WORLD
    model, batch = build_model(tied), global_batch()
    if dtype == "bf16":  # DeepSpeed keeps fp32 master weights made from the bf16-rounded parameters
        truth = reference_trajectory(model, batch, torch.float64, torch.float64, start_dtype=torch.bfloat16)
        base = reference_trajectory(model, batch, torch.bfloat16, torch.float32, start_dtype=torch.bfloat16)
        margin, atol = 3.0, 1e-5
    else:
        truth = reference_trajectory(model, batch, torch.float64, torch.float64)
        base = reference_trajectory(model, batch, torch.float32, torch.float32)
        margin, atol = 2.0, 1e-7
    assert sorted(result["params"]) == sorted(truth), (sorted(result["params"]), sorted(truth))
    start = dict(model.named_parameters())
    for name, p in result["params"].items():
        moved = (truth[name] - start[name].double()).abs().max()
        assert moved > 5 * atol, f"{case}: {name} barely moves in 2 steps ({moved:.2e}); the test would be blind"
        assert_close(
            p,
            truth[name],
            what=f"{case}: {name} after {STEPS} steps",
            baseline=base[name],
            dtype=torch.float32,
            margin=margin,
            atol=atol,
        )


def test_zero3_probe_tie_is_finite_and_keeps_the_hook_path():
    """Under ZeRO-3 the probe step adds zero times the probe's sum to the loss; an fp16 probe that a
    large multiplier overflowed must not make that inf * 0 = NaN, and backward must still reach the
    head output (where DeepSpeed's hooks sit). No DeepSpeed launch: the helper alone."""
    from gem_kernels.integrations._head import zero3_tie

    raw = torch.tensor([[-1024.0, 1.0, 1024.0]], dtype=torch.float16, requires_grad=True)
    for make in (lambda: raw * 1000.0, lambda: raw * 1000.0 - raw * 1000.0):  # fp16 overflow: +-inf; nan
        head_output = make()
        reached = []
        head_output.register_hook(reached.append)
        loss = torch.tensor(1.5, requires_grad=True)
        total = loss + zero3_tie(head_output, probe=True).to(loss.dtype)
        assert torch.isfinite(head_output).logical_not().any() and total.item() == 1.5
        total.backward()
        assert len(reached) == 1 and torch.all(reached[0] == 0) and torch.all(raw.grad == 0)
        raw.grad = None
    empty = raw[:, :0] * 2
    assert zero3_tie(empty, probe=False).item() == 0 and zero3_tie(empty, probe=False).requires_grad


def test_ungathered_zero3_head_is_refused_before_the_kernel():
    """A ZeRO-3 head weight still partitioned at the head's call (the model called outside the
    DeepSpeed engine) gives an error naming what to change, not a shape error from the kernel."""
    model, batch = build_model(False), global_batch()
    apply_gem(model, beta=BETA, impl="torch")
    weight = model.lm_head.weight
    weight.ds_id, weight.ds_shape = 0, weight.shape  # what a ZeRO-3 parameter carries ...
    weight.data = torch.empty(0)  # ... and its local shard once released
    with pytest.raises(RuntimeError, match="zero_optimization.stage"):
        model.train()(**batch)


# ----------------------------------------------------------------------------------------------
# The worker: run by torchrun (see deepspeed_results).


def _ds_config(name, stage, offload, accum, dtype, auto: bool):
    zero = {"stage": stage}
    if stage == 3 and not name.endswith("-persist"):
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": "auto" if auto else dtype == "bf16"},
    }
    micro = 2 // accum
    if auto:  # Trainer fills these from TrainingArguments
        cfg.update(
            train_micro_batch_size_per_gpu="auto",
            gradient_accumulation_steps="auto",
            train_batch_size="auto",
            gradient_clipping="auto",
        )
    else:
        cfg.update(
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=accum,
            train_batch_size=micro * accum * WORLD,
            gradient_clipping=0.0,
        )
    return cfg


def _load(out_dir, tied):
    return LlamaForCausalLM.from_pretrained(
        os.path.join(out_dir, f"model-{'tied' if tied else 'untied'}"), dtype=torch.float32
    )


def _run_apply_gem(out_dir, name, stage, tied, init, offload, accum, dtype, rank):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    cfg = _ds_config(name, stage, offload, accum, dtype, auto=False)
    keep = HfDeepSpeedConfig(cfg) if init == "zero_init" else None  # from_pretrained then uses zero.Init
    model = _load(out_dir, tied)
    del keep
    apply_gem(model, beta=BETA, impl="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    engine.train()
    batch = global_batch()
    total = int((shift_causal_labels(batch["labels"]) != -100).sum())
    micro = 2 // accum
    for _ in range(STEPS):
        for a in range(accum):
            rows = slice(2 * rank + a * micro, 2 * rank + (a + 1) * micro)
            out = engine(**{k: v[rows] for k, v in batch.items()}, num_items_in_batch=total)
            # engine.backward divides by the accumulation steps and the gradients are averaged over
            # the processes: undo both, so the step is that of the global batch's mean.
            engine.backward(out.loss * WORLD * accum)
            engine.step()
    return engine


def _run_trainer(out_dir, name, route, stage, tied, init, offload, accum, dtype):
    import datasets

    cfg = _ds_config(name, stage, offload, accum, dtype, auto=True)
    model = _load(out_dir, tied) if init == "normal" else None  # before the args: no zero.Init
    common = dict(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=2 // accum,
        gradient_accumulation_steps=accum,
        max_steps=STEPS,
        learning_rate=LR,
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
        bf16=dtype == "bf16",
        deepspeed=cfg,
    )
    if route == "gem_sft_trainer":
        from trl import SFTConfig

        from gem_kernels.integrations.trl import GEMSFTTrainer

        args = SFTConfig(**common, completion_only_loss=True)  # TRL default: gradient checkpointing on
    else:
        from gem_kernels.integrations.transformers import GEMTrainer

        args = TrainingArguments(**common)
    if model is None:  # TrainingArguments(deepspeed=ZeRO-3) makes from_pretrained build under zero.Init
        model = _load(out_dir, tied)
    if route == "gem_sft_trainer":
        from test_integrations_trl import word_tokenizer

        trainer = GEMSFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(sft_rows()),
            processing_class=word_tokenizer(),
            gem_options=dict(beta=BETA, impl="torch"),
        )
    else:
        from test_integrations_transformers import ListDataset

        trainer = GEMTrainer(
            model=model, args=args, train_dataset=ListDataset(global_batch()), gem_options=dict(beta=BETA, impl="torch")
        )
    trainer.train()
    return trainer.model_wrapped


def _worker(out_dir: str, names):
    import traceback

    import deepspeed
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    for name in names:
        route, stage, tied, init, offload, accum, dtype = CASES[name]
        try:
            if route == "apply_gem":
                engine = _run_apply_gem(out_dir, name, stage, tied, init, offload, accum, dtype, rank)
            else:
                engine = _run_trainer(out_dir, name, route, stage, tied, init, offload, accum, dtype)
            params = {k: safe_get_full_fp32_param(p).detach().clone() for k, p in engine.module.named_parameters()}
            result = {"world": dist.get_world_size(), "params": params}
        except Exception:  # recorded for the test to report; the other cases still run
            result = {"error": traceback.format_exc()}
        finally:
            unset_hf_deepspeed_config()
            AcceleratorState._reset_state(True)  # the next Trainer builds its own accelerator
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"{name}.pt"))
        dist.barrier()


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
    # Everything is saved: skip interpreter teardown, where gloo's threads were seen to abort now and then.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
