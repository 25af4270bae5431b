"""More ways a trainer integration could train something other than GEM (as in
test_integrations_refusals.py): the MoE router loss under gradient accumulation (each GEM trainer follows the
trainer it replaces), a collator's shift_labels on the compute_loss_func route, and PEFT heads."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_integrations_refusals import assert_matches_reference, fused_step  # noqa: E402
from test_integrations_transformers import (  # noqa: E402
    BETA,
    HIDDEN,
    VOCAB,
    ListDataset,
    make_batch,
    tiny_model,
    trainer_args,
)
from transformers import Trainer  # noqa: E402

from gem_kernels.integrations.transformers import (  # noqa: E402
    GEMTrainer,
    apply_gem,
    gem_compute_loss_func,
    shift_causal_labels,
)
from gem_kernels.reference import gem_loss_reference  # noqa: E402

COEF = 0.5


def tiny_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        decoder_sparse_step=1,
        router_aux_loss_coef=COEF,
        output_router_logits=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(cfg)
    model.set_experts_implementation("eager")  # the grouped-mm experts refuse the float64 reference
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def gem_plus_aux(rows, aux_weight):
    """Reference loss of one optimizer step over micro-batches of one row each: GEM of all rows
    divided by their total target count, plus ``aux_weight * COEF * aux_loss`` of every row."""
    total = sum(int((shift_causal_labels(r["labels"]) != -100).sum()) for r in rows)

    def loss_fn(m):
        loss = 0.0
        for r in rows:
            out = m(input_ids=r["input_ids"], attention_mask=r["attention_mask"], output_router_logits=True)
            loss = (
                loss
                + gem_loss_reference(out.logits, shift_causal_labels(r["labels"]), beta=BETA, num_items_in_batch=total)
                + aux_weight * COEF * out.aux_loss
            )
        return loss

    return loss_fn


def sgd_step(trainer, model):
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainer.train()
    steps = {k: start[k] - p.detach() for k, p in model.named_parameters() if not torch.equal(start[k], p.detach())}
    return torch.tensor(trainer.state.log_history[0]["loss"]), steps


def test_gem_trainer_moe_aux_loss_follows_transformers(tmp_path):
    """transformers' rule: the model adds COEF * aux_loss to each micro-batch's loss, undivided."""
    batch = make_batch(n=2, seq=12)
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)]
    model = tiny_moe()
    before = copy.deepcopy(model)
    trainer = GEMTrainer(
        model=model,
        args=trainer_args(tmp_path, 1, 2),
        train_dataset=ListDataset(batch),
        gem_options=dict(beta=BETA, impl="torch"),
    )
    logged, steps = sgd_step(trainer, model)
    assert_matches_reference(logged, steps, before, gem_plus_aux(rows, 1.0), what="GEMTrainer MoE k=2")


def test_gem_sft_trainer_moe_aux_loss_follows_trl(tmp_path):
    """TRL's rule (SFTTrainer): COEF * aux_loss / accumulation steps per micro-batch (GEMSFTTrainer
    added it undivided: router gradients 2x)."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from test_integrations_trl import expected_batch, sft_args, sft_rows, word_tokenizer

    from gem_kernels.integrations.trl import GEMSFTTrainer

    data = sft_rows("completion", n=2)
    padded = expected_batch(data)
    rows = []
    for i, r in enumerate(data):  # micro-batches of one row: no padding
        n = len(r["input_ids"])
        rows.append({k: v[i : i + 1, :n] for k, v in padded.items()})
    model = tiny_moe()
    before = copy.deepcopy(model)
    trainer = GEMSFTTrainer(
        model=model,
        args=sft_args(tmp_path, per_device_train_batch_size=1),
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=word_tokenizer(),
        gem_options=dict(beta=BETA, impl="torch"),
    )
    logged, steps = sgd_step(trainer, model)
    assert_matches_reference(logged, steps, before, gem_plus_aux(rows, 0.5), what="GEMSFTTrainer MoE k=2")
    assert "aux_loss" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------------------------
# A collator's shift_labels (padding-free / context parallel) reach every route.


def packed_rows():
    """Rows of two packed sequences each: shift_labels masks the boundary, where labels shifted
    again would train the first token of the second sequence on the last of the first."""
    batch = make_batch(n=4, seq=12)
    shift = shift_causal_labels(batch["labels"])
    for i in range(4):
        shift[i, 4 + i] = -100  # the last token of sequence one, before sequence two starts
    batch["shift_labels"] = shift
    return batch


@pytest.mark.parametrize("route", ["compute_loss_func", "gem_trainer", "gem_trainer_logits"])
def test_shift_labels_reach_the_loss(tmp_path, route):
    batch = packed_rows()
    total = int((batch["shift_labels"] != -100).sum())
    assert total < int((shift_causal_labels(batch["labels"]) != -100).sum())
    model = tiny_model("llama")
    before = copy.deepcopy(model)
    # shift_labels is no forward parameter: keep Trainer from dropping it from the rows (a collator
    # that builds it, as padding-free ones do, is not affected)
    args = trainer_args(tmp_path, 2, 2, remove_unused_columns=False)
    if route == "compute_loss_func":
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch"),
        )
    elif route == "gem_trainer_logits":
        trainer = GEMTrainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch"),
        )
    else:
        trainer = GEMTrainer(
            model=model, args=args, train_dataset=ListDataset(batch), gem_options=dict(beta=BETA, impl="torch")
        )
    logged, steps = sgd_step(trainer, model)

    def loss_fn(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return gem_loss_reference(logits, batch["shift_labels"], beta=BETA, num_items_in_batch=total)

    assert_matches_reference(logged, steps, before, loss_fn, what=f"{route} with shift_labels, k=2")


@pytest.mark.parametrize("route", ["gem_trainer", "gem_trainer_logits"])
def test_gem_trainers_tell_the_loss_without_walking_the_stack(tmp_path, monkeypatch, route):
    """A GEM trainer tells the patched forward (its count uses ignore_index) and the callable (the
    batch's shift_labels) directly: the call-stack lookup, which serves plain Trainers, never runs,
    and the step is still exact (ignore_index=0 and a collator's shift_labels, k=2)."""
    from gem_kernels.integrations import _apply, _logits_path

    def walk(*args, **kwargs):
        raise AssertionError("a GEM trainer's step looked for the Trainer on the call stack")

    monkeypatch.setattr(_apply, "calling_trainer", walk)
    monkeypatch.setattr(_logits_path, "calling_trainer", walk)
    batch = packed_rows()
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 0)
    batch["shift_labels"] = batch["shift_labels"].masked_fill(batch["shift_labels"] == -100, 0)
    total = int((batch["shift_labels"] != 0).sum())
    model = tiny_model("llama")
    before = copy.deepcopy(model)
    args = trainer_args(tmp_path, 2, 2, remove_unused_columns=False)
    if route == "gem_trainer_logits":
        trainer = GEMTrainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch", ignore_index=0),
        )
    else:
        trainer = GEMTrainer(
            model=model,
            args=args,
            train_dataset=ListDataset(batch),
            gem_options=dict(beta=BETA, impl="torch", ignore_index=0),
        )
    logged, steps = sgd_step(trainer, model)

    def loss_fn(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return gem_loss_reference(logits, batch["shift_labels"], beta=BETA, ignore_index=0, num_items_in_batch=total)

    assert_matches_reference(logged, steps, before, loss_fn, what=f"{route}, ignore_index=0, shift_labels, k=2")


# ----------------------------------------------------------------------------------------------
# PEFT: a LoRA on the head is refused with what to do; modules_to_save=["lm_head"] is fused.


def test_lora_head_is_refused_with_the_full_class():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(TypeError, match=r"peft\.tuners\.lora\.layer\.Linear.*gem_compute_loss_func.*modules_to_save"):
        apply_gem(model, beta=BETA)


def test_modules_to_save_head_uses_the_fused_path():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    model = peft.get_peft_model(tiny_model("llama"), config)
    batch = make_batch(n=2, seq=8)
    before = copy.deepcopy(model)
    apply_gem(model, beta=BETA, impl="torch")
    loss, grads = fused_step(model, batch)
    trained = "base_model.model.lm_head.modules_to_save.default.weight"
    assert trained in grads and "base_model.model.lm_head.original_module.weight" not in grads

    def loss_fn(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return gem_loss_reference(logits, shift_causal_labels(batch["labels"]), beta=BETA)

    assert_matches_reference(loss, grads, before, loss_fn, what="PEFT modules_to_save head")
    with model.disable_adapter():  # adapters off: the original head, still fused
        model.zero_grad()
        loss_off = model(**batch).loss
    assert not torch.equal(loss_off, loss)
