"""GEM in TRL's SFTTrainer: GEMSFTTrainer (fused path) and SFTTrainer(compute_loss_func=...) (logits
path), with completion-only and assistant-only masks. Tiny models and a word-level tokenizer built
in memory; no downloads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from helpers import assert_close  # noqa: E402
from test_integrations_transformers import BETA, VOCAB, same_dtype_baseline, tiny_model, truth  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from gem_kernels.integrations.transformers import gem_compute_loss_func  # noqa: E402
from gem_kernels.integrations.trl import GEMSFTTrainer  # noqa: E402


def word_tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def sft_rows(masks: str, n: int = 4):
    """Pre-tokenized rows of different lengths with a completion mask (prompt of varying length)
    and/or an assistant mask (one masked-out span inside the answer)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 8 + 2 * i
        row = {"input_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist()}
        if "completion" in masks:
            row["completion_mask"] = [0] * (2 + i) + [1] * (length - 2 - i)
        if "assistant" in masks:
            row["assistant_masks"] = [1 if not (3 <= j < 5 + i % 2) else 0 for j in range(length)]
        rows.append(row)
    return rows


def expected_batch(rows):
    """The batch SFTTrainer should train on, built here independently of TRL: right padding, -100
    wherever a mask is 0 or on padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        keep = torch.ones(n, dtype=torch.bool)
        for col in ("completion_mask", "assistant_masks"):
            if col in r:
                keep &= torch.tensor(r[col], dtype=torch.bool)
        labels[i, :n] = torch.where(keep, ids[i, :n], torch.full((n,), -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_args(tmp_path, **overrides):
    kw = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        completion_only_loss=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    kw.update(overrides)
    return SFTConfig(**kw)


@pytest.mark.parametrize(
    "route,masks",
    [
        ("gem_sft_trainer", "completion"),
        ("gem_sft_trainer", "assistant"),
        ("gem_sft_trainer", "completion+assistant"),
        ("compute_loss_func", "completion+assistant"),
    ],
)
def test_sft_step_equals_reference(tmp_path, route, masks):
    """One SGD step (lr 1, accumulation 2) moves the parameters by -grad of GEM on the masked labels
    of the whole batch, computed by gem_loss_reference on the full logits in float64."""
    rows = sft_rows(masks)
    model = tiny_model("llama")
    batch = expected_batch(rows)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    t_loss, t_grads = truth(model, batch)
    b_loss, b_grads = same_dtype_baseline(model, batch)
    common = dict(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
    )
    if route == "gem_sft_trainer":
        trainer = GEMSFTTrainer(**common, gem_options=dict(beta=BETA, impl="torch"))
    else:
        with pytest.warns(FutureWarning, match="compute_loss_func"):
            trainer = SFTTrainer(**common, compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch"))
    trainer.train()
    log = trainer.state.log_history[0]
    assert_close(
        torch.tensor(log["loss"]),
        t_loss.float(),
        what=f"{route}/{masks} logged loss",
        baseline=b_loss,
        dtype=torch.float32,
        atol=1e-5,
    )
    for name, p in model.named_parameters():
        assert_close(
            start[name] - p.detach(),
            t_grads[name],
            what=f"{route}/{masks} step of {name}",
            baseline=b_grads[name],
            dtype=torch.float32,
        )
    if route == "gem_sft_trainer":
        assert "ce" in log and log["num_tokens"] == float(batch["attention_mask"].sum())


def test_gem_sft_trainer_with_trl_defaults(tmp_path):
    """TRL's defaults (bf16 autocast, activation checkpointing) train with the fused path; the first
    loss agrees with the float64 truth to bf16 accuracy."""
    rows = sft_rows("completion")
    model = tiny_model("llama")
    t_loss, _ = truth(model, expected_batch(rows))
    args = sft_args(
        tmp_path, bf16=True, activation_checkpointing=True, max_steps=2, learning_rate=1e-3, optim="adamw_torch"
    )
    trainer = GEMSFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
        gem_options=dict(beta=BETA, impl="torch"),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2
    assert abs(losses[0] - t_loss.item()) <= 0.05 * abs(t_loss.item()) + 0.05, (losses, t_loss.item())
