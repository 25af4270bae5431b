"""The trainers log ce, entropy and mean_token_accuracy from GEM's own pass (fused and logits paths),
averaged as TRL 1.16's SFTTrainer averages its own: per micro-batch a token mean over every process,
then the plain mean over the logging window. Checked against the float64 reference on the full
logits with gradient accumulation 1 and 2."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402
from test_integrations_transformers import (  # noqa: E402
    BETA,
    ListDataset,
    full_batch_ce,
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


def expected_logs(model, batch, accum):
    """(entropy, mean_token_accuracy) by TRL's rule over ``accum`` sequential micro-batches, from
    the float64 reference on the model's full logits before the step."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_causal_labels(batch["labels"])
    _, metrics = gem_loss_reference(logits, targets, beta=BETA, reduction="none", return_metrics=True)
    rows = batch["input_ids"].shape[0] // accum
    ent, acc = [], []
    for k in range(accum):
        sl = slice(k * rows, (k + 1) * rows)
        n = (targets[sl] != -100).sum().double()
        ent.append(metrics["entropy"][sl].sum() / n)
        acc.append(metrics["token_accuracy"][sl].sum() / n)
    return torch.stack(ent).mean(), torch.stack(acc).mean()


def _make_some_predictions_right(model, batch):
    """Set every other target to the model's arg-max there (labels only, so the logits do not
    change): the logged accuracy is then far from 0 and tests something."""
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    labels = batch["labels"]
    take = (labels[:, 1:] != -100) & (torch.arange(labels.shape[1] - 1) % 2 == 0)
    labels[:, 1:] = torch.where(take, pred[:, :-1], labels[:, 1:])


def _trainer(path, model, args, dataset, **kw):
    if path == "fused":
        return GEMTrainer(
            model=model, args=args, train_dataset=dataset, gem_options=dict(beta=BETA, impl="torch"), **kw
        )
    fn = gem_compute_loss_func(beta=BETA, impl="torch")
    if path == "logits":
        return GEMTrainer(model=model, args=args, train_dataset=dataset, compute_loss_func=fn, **kw)
    return Trainer(model=model, args=args, train_dataset=dataset, compute_loss_func=fn, callbacks=[fn])


@pytest.mark.parametrize("path", ["fused", "logits", "plain_trainer_callback"])
@pytest.mark.parametrize("accum", [1, 2])
def test_trainers_log_entropy_and_accuracy(tmp_path, path, accum):
    model, batch = tiny_model("llama"), make_batch(n=4)
    _make_some_predictions_right(model, batch)
    before = copy.deepcopy(model)
    want_ent, want_acc = expected_logs(before, batch, accum)
    args = trainer_args(tmp_path, 4 // accum, accum, train_sampling_strategy="sequential")
    trainer = _trainer(path, model, args, ListDataset(batch))
    trainer.train()
    log = trainer.state.log_history[0]
    for key in ("ce", "entropy", "mean_token_accuracy"):
        assert key in log, (path, log)
    assert 0.2 < want_acc < 0.8, want_acc
    assert_close(torch.tensor(log["entropy"]), want_ent, what=f"{path} k={accum} entropy", atol=1e-5, rtol=1e-5)
    assert_close(
        torch.tensor(log["mean_token_accuracy"]), want_acc, what=f"{path} k={accum} accuracy", atol=1e-6, rtol=1e-6
    )
    assert_close(
        torch.tensor(log["ce"]),
        full_batch_ce(before, batch),
        what=f"{path} k={accum} ce",
        dtype=torch.float32,
        atol=1e-5,
    )


def test_window_of_two_steps_is_the_mean_of_its_micro_batches(tmp_path):
    """logging_steps=2: the logged values average all four micro-batches of the window (the
    second step's values come from the once-updated model, so compare with the per-step logs)."""
    model, batch = tiny_model("llama"), make_batch(n=4)
    args = trainer_args(tmp_path, 2, 1, steps=2, train_sampling_strategy="sequential")
    args.learning_rate = 0.0  # the model does not move: every step sees the same weights
    trainer = _trainer("fused", copy.deepcopy(model), args, ListDataset(batch))
    trainer.train()
    per_step = [h for h in trainer.state.log_history if "entropy" in h]
    args2 = trainer_args(tmp_path, 2, 1, steps=2, train_sampling_strategy="sequential")
    args2.learning_rate, args2.logging_steps = 0.0, 2
    trainer2 = _trainer("fused", copy.deepcopy(model), args2, ListDataset(batch))
    trainer2.train()
    window = [h for h in trainer2.state.log_history if "entropy" in h]
    assert len(per_step) == 2 and len(window) == 1
    for key in ("entropy", "mean_token_accuracy"):
        mean = (per_step[0][key] + per_step[1][key]) / 2
        assert abs(window[0][key] - mean) < 1e-6, (key, window, per_step)
    want_ent, _ = expected_logs(model, batch, 2)
    assert abs(window[0]["entropy"] - want_ent.item()) < 1e-5


def test_log_metrics_off(tmp_path):
    model, batch = tiny_model("llama"), make_batch(n=4)
    trainer = GEMTrainer(
        model=model,
        args=trainer_args(tmp_path, 4, 1),
        train_dataset=ListDataset(batch),
        gem_options=dict(beta=BETA, impl="torch"),
        log_metrics=False,
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert "entropy" not in log and "mean_token_accuracy" not in log and "ce" in log
    with pytest.raises(TypeError, match="log_metrics must be a bool"):
        GEMTrainer(model=model, args=trainer_args(tmp_path, 4, 1), log_metrics="no")


def test_logits_path_refusals(tmp_path):
    model, batch = tiny_model("llama"), make_batch(n=2)
    with pytest.raises(ValueError, match="compute_loss_func"):
        GEMTrainer(
            model=model,
            args=trainer_args(tmp_path, 2, 1),
            train_dataset=ListDataset(batch),
            compute_loss_func=lambda *a, **k: None,
        )
    with pytest.raises(ValueError, match="give the GEM options to gem_compute_loss_func"):
        GEMTrainer(
            model=model,
            args=trainer_args(tmp_path, 2, 1),
            train_dataset=ListDataset(batch),
            compute_loss_func=gem_compute_loss_func(),
            gem_options=dict(beta=0.5),
        )


def test_fused_model_output_fields():
    model, batch = tiny_model("llama"), make_batch(n=2, seq=8)
    apply_gem(model, beta=BETA, impl="torch", return_metrics=True)
    model.train()
    out = model(**batch)
    for name in ("ce", "entropy", "token_accuracy"):
        assert out[name] is not None and out[name].dim() == 0 and not out[name].requires_grad
    model.eval()
    out = model(**batch)
    assert out.get("entropy") is None and out.logits is not None


@pytest.mark.parametrize("route", ["gem_sft_trainer", "gem_sft_trainer_logits"])
def test_gem_sft_trainer_logs_trl_metrics(tmp_path, route):
    """GEMSFTTrainer (accumulation 2) logs TRL's entropy and mean_token_accuracy from GEM's pass."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_integrations_trl import expected_batch, sft_args, sft_rows, word_tokenizer

    from gem_kernels.integrations.trl import GEMSFTTrainer

    rows = sft_rows("completion")
    model = tiny_model("llama")
    batch = expected_batch(rows)
    want_ent, want_acc = expected_logs(model, batch, 2)
    common = dict(
        model=model,
        args=sft_args(tmp_path, train_sampling_strategy="sequential"),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_tokenizer(),
    )
    if route == "gem_sft_trainer":
        trainer = GEMSFTTrainer(**common, gem_options=dict(beta=BETA, impl="torch"))
    else:
        with pytest.warns(FutureWarning, match="compute_loss_func"):
            trainer = GEMSFTTrainer(**common, compute_loss_func=gem_compute_loss_func(beta=BETA, impl="torch"))
    trainer.train()
    log = trainer.state.log_history[0]
    assert_close(torch.tensor(log["entropy"]), want_ent, what=f"{route} entropy", atol=1e-5, rtol=1e-5)
    assert_close(torch.tensor(log["mean_token_accuracy"]), want_acc, what=f"{route} accuracy", atol=1e-6, rtol=1e-6)
    assert log["num_tokens"] == float(batch["attention_mask"].sum()) and "ce" in log


def test_plain_compute_loss_func_without_consumer_holds_no_window():
    # Trainer(compute_loss_func=fn) without callbacks=[fn]: nothing drains the window, so nothing
    # may be recorded (else the window grows by one row per micro-batch: 1000 rows after 1000 calls).
    fn = gem_compute_loss_func(beta=BETA, impl="torch")
    z = torch.randn(2, 5, 11, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    for _ in range(1000):
        fn({"logits": z}, y)
    assert len(fn.window) == 0 and fn.window.held_rows() == 0
    assert fn._ce_sum is None and fn.last_metrics is None  # the statistics were not even computed
    fn.attach_consumer()  # what GEMTrainer / the callback hooks do
    fn({"logits": z}, y)
    assert len(fn.window) == 1 and fn.last_metrics is not None


def test_metric_window_folds_into_constant_state():
    # A window that is never logged (logging_strategy="no") holds at most FOLD_EVERY - 1 rows, and
    # folding keeps TRL's rule: per micro-batch sums over processes, then the mean of the ratios.
    from gem_kernels.integrations._metrics import FOLD_EVERY, MetricWindow

    calls = []

    def two_processes(rows):  # the other process saw the same micro-batches with 3 more valid tokens
        calls.append(rows.shape[0])
        return rows + torch.tensor([0.0, 0.0, 3.0], dtype=rows.dtype)

    window, g = MetricWindow(two_processes), torch.Generator().manual_seed(0)
    want_ent, want_acc = [], []
    for _ in range(1000):
        ent, acc = torch.rand(2, generator=g, dtype=torch.float64)
        n = int(torch.randint(0, 5, (1,), generator=g))
        window.add({"entropy": ent, "token_accuracy": acc}, torch.tensor(n))
        denom = max(n, 1)
        want_ent.append(ent * denom / (n + 3))
        want_acc.append(acc * denom / (n + 3))
        assert window.held_rows() < FOLD_EVERY
    assert len(window) == 1000 and max(calls) == FOLD_EVERY
    got = window.pop()
    assert sum(calls) == 1000 and len(window) == 0 and window.pop() is None
    assert_close(
        torch.tensor(got["entropy"], dtype=torch.float64),
        torch.stack(want_ent).mean(),
        what="folded entropy",
        atol=1e-12,
        rtol=1e-12,
    )
    assert_close(
        torch.tensor(got["mean_token_accuracy"], dtype=torch.float64),
        torch.stack(want_acc).mean(),
        what="folded accuracy",
        atol=1e-12,
        rtol=1e-12,
    )
