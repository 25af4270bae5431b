"""Does GEM keep a fine-tuned model's outputs diverse where cross-entropy collapses them?

A CPU-sized experiment, rerunnable in minutes. A tiny Llama (built from a config, no downloads) is
first trained with CE on a balanced version of the task (the "base model", which knows every valid
answer), then fine-tuned from that same base through the Hugging Face Trainer: once with plain
cross-entropy (the stock ``Trainer``) and once per GEM beta with the package's
``gem_kernels.integrations.transformers.GEMTrainer`` (the fused path, ``impl="torch"`` on CPU).
``--from-scratch`` skips the base model and fine-tunes a randomly initialised one instead.

The task. A prompt is ``BOS, category, noise, noise, noise, SEP``; its answer is two "word" tokens.
Each of the 8 categories has 4 equally valid answers, but the fine-tuning data shows them
unbalanced: 60% / 25% / 10% / 5% of that category's examples. The noise tokens make every prompt
unique, so the held-out prompts (same categories, fresh noise, never seen in training) test
generalisation, and a model that memorises its training prompts through the noise has something to
overfit to.

Measured at checkpoints during fine-tuning, from n answers sampled (temperature 1, no top-k/top-p)
for each held-out prompt:
  * entropy  - mean entropy (nats) of the next-token distribution at the two answer positions,
               along the sampled answers;
  * distinct - number of distinct valid answers among a prompt's samples (mean over prompts, max 4);
  * accuracy - share of sampled answers that are one of the category's valid answers.
The GEM runs also report "train H": the entropy of the model's distribution at the training
answers' tokens (teacher-forced, training prompts), which GEMTrainer logs for free from the loss's
own pass (`entropy`, averaged over the eval_every steps before each checkpoint). The CE run uses
the stock Trainer, which does not log it.

Usage:
    python examples/diversity.py            # full run (CE, GEM beta 0.7 and 0.5), a few minutes
    python examples/diversity.py --quick    # CE and GEM beta 0.7, under a minute; plot in examples/results/
    python examples/diversity.py --out docs/img/diversity.png --seed 1 --betas 0.7 0.5

Reference point for reading the numbers (the "data" row): a model that reproduced the fine-tuning
distribution exactly would have first-token entropy H(0.6, 0.25, 0.1, 0.05) = 1.03 nats and a
deterministic second token, so 0.52 nats per answer token, and would show sum_i 1 - (1 - p_i)^n
distinct answers in n samples.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------
PAD, BOS, SEP = 0, 1, 2
# Default place of the plot: beside this script, gitignored (never the repository root, never docs/img).
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NUM_CATEGORIES = 8
NUM_NOISE = 32  # noise vocabulary
NUM_WORDS = 16  # answer vocabulary; an answer is two words
NOISE_LEN = 3
ANSWER_LEN = 2
ANSWERS_PER_CATEGORY = 4
TRAIN_SHARES = (0.60, 0.25, 0.10, 0.05)  # how often the training data shows answer 0, 1, 2, 3

CAT0 = 3
NOISE0 = CAT0 + NUM_CATEGORIES
WORD0 = NOISE0 + NUM_NOISE
VOCAB_SIZE = 64  # >= WORD0 + NUM_WORDS = 59; unused ids stay in the softmax as invalid outputs
PROMPT_LEN = 3 + NOISE_LEN  # BOS, category, noise..., SEP


@dataclass
class Task:
    """valid[c] = the category's ANSWERS_PER_CATEGORY answers (tuples of token ids), ordered from the
    most to the least frequent in training."""

    valid: List[List[tuple]]

    def is_valid(self, category: int, answer: tuple) -> bool:
        return answer in self.valid[category]


def make_task(seed: int) -> Task:
    """Each category gets 4 answers with distinct first words (so the first answer token decides
    which answer it is) and random second words; categories share the word vocabulary, so the
    model must read the category token to know which pairs are valid."""
    g = torch.Generator().manual_seed(seed)
    valid = []
    for _ in range(NUM_CATEGORIES):
        first = torch.randperm(NUM_WORDS, generator=g)[:ANSWERS_PER_CATEGORY]
        second = torch.randint(NUM_WORDS, (ANSWERS_PER_CATEGORY,), generator=g)
        valid.append([(WORD0 + int(a), WORD0 + int(b)) for a, b in zip(first, second)])
    return Task(valid)


def make_prompts(num_per_category: int, g: torch.Generator, exclude=frozenset()) -> List[tuple]:
    """num_per_category distinct prompts per category, none of them in ``exclude``."""
    prompts, seen = [], set(exclude)
    for c in range(NUM_CATEGORIES):
        made = 0
        while made < num_per_category:
            noise = (NOISE0 + torch.randint(NUM_NOISE, (NOISE_LEN,), generator=g)).tolist()
            p = (BOS, CAT0 + c, *noise, SEP)
            if p not in seen:
                seen.add(p)
                prompts.append(p)
                made += 1
    return prompts


def category_of(prompt: Sequence[int]) -> int:
    return int(prompt[1]) - CAT0


def make_train_set(task: Task, num_per_category: int, shares: Sequence[float], g: torch.Generator, exclude=frozenset()):
    """Training examples with the answers in exactly the given proportions per category, on fresh
    prompts (none in ``exclude``). Labels are -100 on the prompt (only the answer is trained on, as
    in SFT) and aligned with input_ids; the causal shift is the model's / loss integration's job."""
    prompts = make_prompts(num_per_category, g, exclude)
    counts = [round(s * num_per_category) for s in shares]
    counts[0] += num_per_category - sum(counts)
    examples = []
    for c in range(NUM_CATEGORIES):
        answers = [a for a, k in zip(task.valid[c], counts) for _ in range(k)]
        for prompt, answer in zip(prompts[c * num_per_category : (c + 1) * num_per_category], answers):
            ids = torch.tensor(prompt + answer)
            labels = ids.clone()
            labels[:PROMPT_LEN] = -100
            examples.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return examples, prompts


# ---------------------------------------------------------------------------------------------
# Model and metrics
# ---------------------------------------------------------------------------------------------
def make_model(seed: int, state_dict=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)  # identical initial weights for every loss
    model = LlamaForCausalLM(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


@torch.no_grad()
def diversity_metrics(model, task: Task, prompts: List[tuple], num_samples: int, seed: int) -> Dict[str, float]:
    """Sample ``num_samples`` answers (temperature 1) per prompt; see the module docstring."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)  # the same random stream at every checkpoint
    tokens = torch.tensor(prompts).repeat_interleave(num_samples, dim=0)  # [P * n, PROMPT_LEN]
    entropies = []
    for _ in range(ANSWER_LEN):
        logits = model(input_ids=tokens).logits[:, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
        nxt = torch.multinomial(logp.exp(), 1, generator=g)
        tokens = torch.cat([tokens, nxt], dim=1)
    model.train(was_training)
    answers = tokens[:, PROMPT_LEN:].view(len(prompts), num_samples, ANSWER_LEN).tolist()
    valid_count, distinct = 0, 0
    for prompt, samples in zip(prompts, answers):
        c = category_of(prompt)
        ok = [tuple(a) for a in samples if task.is_valid(c, tuple(a))]
        valid_count += len(ok)
        distinct += len(set(ok))
    return {
        "entropy": torch.stack(entropies).mean().item(),
        "distinct": distinct / len(prompts),
        "accuracy": valid_count / (len(prompts) * num_samples),
    }


def data_reference(num_samples: int) -> Dict[str, float]:
    """The metrics of a model that reproduces the training distribution exactly (expected values)."""
    h = -sum(s * math.log(s) for s in TRAIN_SHARES)
    return {
        "entropy": h / ANSWER_LEN,
        "distinct": sum(1 - (1 - s) ** num_samples for s in TRAIN_SHARES),
        "accuracy": 1.0,
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class Setting:
    steps: int  # fine-tuning steps per loss
    eval_every: int
    train_per_category: int  # fine-tuning prompts per category (answers in TRAIN_SHARES proportions)
    heldout_per_category: int
    samples: int  # sampled answers per held-out prompt
    pretrain_steps: int  # CE on balanced answers, once, shared by every fine-tuning run
    pretrain_per_category: int
    batch_size: int = 32
    lr: float = 2e-3
    betas: Sequence[float] = (0.7,)


SETTINGS = {
    "full": Setting(
        steps=600,
        eval_every=50,
        train_per_category=40,
        heldout_per_category=16,
        samples=32,
        pretrain_steps=300,
        pretrain_per_category=256,
        betas=(0.7, 0.5),
    ),
    "quick": Setting(
        steps=200,
        eval_every=25,
        train_per_category=40,
        heldout_per_category=8,
        samples=16,
        pretrain_steps=300,
        pretrain_per_category=256,
    ),
    # for the test suite only: exercises every code path, says nothing about the science
    "smoke": Setting(
        steps=6,
        eval_every=3,
        train_per_category=8,
        heldout_per_category=2,
        samples=4,
        pretrain_steps=3,
        pretrain_per_category=8,
    ),
}


@dataclass
class History:
    label: str
    steps: List[int] = field(default_factory=list)
    metrics: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""  # how the loss was computed, for the record
    # (step, entropy, token accuracy) that the trainer logged over the window ending at that step
    train: List[tuple] = field(default_factory=list)


def _make_callback(history: History, task, prompts, setting: Setting, seed: int):
    from transformers import TrainerCallback

    class DiversityCallback(TrainerCallback):
        def _record(self, step, model):
            history.steps.append(step)
            history.metrics.append(diversity_metrics(model, task, prompts, setting.samples, seed))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % setting.eval_every == 0 or state.global_step == state.max_steps:
                self._record(state.global_step, model)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # GEMTrainer's training statistics, from the same pass as the loss (no extra work)
            if logs and "entropy" in logs:
                history.train.append((state.global_step, logs["entropy"], logs["mean_token_accuracy"]))

    return DiversityCallback()


def gem_trainer(beta: float):
    """The GEM run's Trainer class and extra Trainer kwargs, from the package's integration."""
    from gem_kernels.integrations import transformers as gem_hf

    # impl="torch": the chunked PyTorch path, the right one on CPU (Triton would run interpreted).
    return gem_hf.GEMTrainer, {"gem_options": {"beta": beta, "h": "linear", "impl": "torch"}}, "GEMTrainer"


def _train(
    model,
    trainer_cls,
    extra: dict,
    train_set,
    steps: int,
    setting: Setting,
    seed: int,
    workdir: str,
    callbacks=(),
    log_every: Optional[int] = None,
):
    from transformers import PrinterCallback, TrainingArguments, default_data_collator

    logging = dict(logging_strategy="steps", logging_steps=log_every) if log_every else dict(logging_strategy="no")
    args = TrainingArguments(
        output_dir=workdir,
        per_device_train_batch_size=setting.batch_size,
        max_steps=steps,
        learning_rate=setting.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, steps // 10),
        weight_decay=0.0,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **logging,
    )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_set,
        data_collator=default_data_collator,
        callbacks=list(callbacks),
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table
    trainer.train()


def pretrain(task: Task, setting: Setting, seed: int, exclude, workdir: str):
    """The "base model": CE on a larger set where all 4 answers of a category are equally frequent,
    so fine-tuning starts from a model that already knows every valid answer (as in SFT of a
    pretrained LLM). Returns (state_dict, prompts used)."""
    from transformers import Trainer

    g = torch.Generator().manual_seed(seed + 2)
    shares = [1 / ANSWERS_PER_CATEGORY] * ANSWERS_PER_CATEGORY
    data, prompts = make_train_set(task, setting.pretrain_per_category, shares, g, exclude)
    model = make_model(seed)
    _train(model, Trainer, {}, data, setting.pretrain_steps, setting, seed, os.path.join(workdir, "pretrain"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, prompts


def finetune(
    loss: str, beta: Optional[float], base, task, train_set, heldout, setting: Setting, seed: int, workdir: str
) -> History:
    from transformers import Trainer

    history = History("CE" if loss == "ce" else f"GEM beta={beta:g}")
    if loss == "ce":
        trainer_cls, extra, history.path = Trainer, {}, "transformers.Trainer (the model's own CE loss)"
    else:
        trainer_cls, extra, history.path = gem_trainer(beta)
    t0 = time.perf_counter()
    _train(
        make_model(seed, base),
        trainer_cls,
        extra,
        train_set,
        setting.steps,
        setting,
        seed,
        os.path.join(workdir, history.label.replace(" ", "_").replace("=", "")),
        callbacks=[_make_callback(history, task, heldout, setting, seed + 1)],
        log_every=setting.eval_every if loss != "ce" else None,
    )
    history.seconds = time.perf_counter() - t0
    return history


def run(mode: str = "full", seed: int = 0, betas: Optional[Sequence[float]] = None, from_scratch: bool = False) -> Dict:
    """Run the experiment; returns {"setting", "reference", "histories", "pretrain_seconds"}."""
    from transformers import enable_full_determinism

    setting = SETTINGS[mode]
    torch.set_num_threads(1)  # reproducible (and, for a model this small, fastest)
    enable_full_determinism(seed, warn_only=False)
    task = make_task(seed)
    g = torch.Generator().manual_seed(seed)
    train_set, train_prompts = make_train_set(task, setting.train_per_category, TRAIN_SHARES, g)
    heldout = make_prompts(setting.heldout_per_category, g, exclude=frozenset(train_prompts))
    runs = [("ce", None)] + [("gem", b) for b in (betas if betas is not None else setting.betas)]
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        base = None
        if not from_scratch:
            base, _ = pretrain(task, setting, seed, frozenset(train_prompts) | frozenset(heldout), workdir)
        pretrain_seconds = time.perf_counter() - t0
        histories = [finetune(loss, b, base, task, train_set, heldout, setting, seed, workdir) for loss, b in runs]
    return {
        "setting": setting,
        "reference": data_reference(setting.samples),
        "histories": histories,
        "pretrain_seconds": pretrain_seconds,
        "from_scratch": from_scratch,
    }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
METRICS = (
    ("entropy", "entropy (nats / answer token)"),
    ("distinct", "distinct valid answers / prompt"),
    ("accuracy", "accuracy (share valid)"),
)


def table(result: Dict) -> str:
    setting, ref = result["setting"], result["reference"]
    lines = [f"{'loss':<14}{'step':>6}{'entropy':>10}{'distinct':>10}{'accuracy':>10}{'train H':>10}"]
    for h in result["histories"]:
        train = {step: ent for step, ent, _ in h.train}
        for step, m in zip(h.steps, h.metrics):
            th = f"{train[step]:>10.3f}" if step in train else f"{'':>10}"
            lines.append(
                f"{h.label:<14}{step:>6}{m['entropy']:>10.3f}{m['distinct']:>10.2f}{m['accuracy']:>10.3f}" + th
            )
        lines.append("")
    lines.append("summary: mean over the checkpoints of the second half of fine-tuning")
    for h in result["histories"]:
        late = [m for step, m in zip(h.steps, h.metrics) if step > setting.steps / 2] or h.metrics[-1:]
        mean = {k: sum(m[k] for m in late) / len(late) for k, _ in METRICS}
        late_train = [ent for step, ent, _ in h.train if step > setting.steps / 2]
        th = f"{sum(late_train) / len(late_train):>10.3f}" if late_train else ""
        lines.append(
            f"{h.label:<14}{'late':>6}{mean['entropy']:>10.3f}{mean['distinct']:>10.2f}{mean['accuracy']:>10.3f}" + th
        )
    lines.append(
        f"{'data':<14}{'':>6}{ref['entropy']:>10.3f}{ref['distinct']:>10.2f}{ref['accuracy']:>10.3f}"
        f"   (a model reproducing the training distribution; n = {setting.samples})"
    )
    return "\n".join(lines)


def plot(result: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, title) in zip(axes, METRICS):
        for h in result["histories"]:
            (line,) = ax.plot(h.steps, [m[key] for m in h.metrics], marker="o", markersize=3, label=h.label)
            if key == "entropy" and h.train:  # the trainer's logged training entropy, same colour
                ax.plot(
                    [t[0] for t in h.train],
                    [t[1] for t in h.train],
                    linestyle=":",
                    color=line.get_color(),
                    label=f"{h.label} (training log)",
                )
        ax.axhline(result["reference"][key], color="gray", linestyle="--", linewidth=1, label="training data")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, ANSWERS_PER_CATEGORY + 0.2)
    lowest = min(m["accuracy"] for h in result["histories"] for m in h.metrics)
    axes[2].set_ylim(max(0.0, min(0.8, lowest - 0.05)), 1.02)  # zoom in when every run is accurate
    axes[0].legend(fontsize=8)
    s = result["setting"]
    fig.suptitle(
        f"held-out prompts, {s.samples} samples each; unbalanced training answers "
        f"{'/'.join(f'{x:.0%}' for x in TRAIN_SHARES)}",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_path(out: Optional[str], mode_name: str) -> str:
    """``--out`` as given, else examples/results/diversity-<mode>.png (its folder created)."""
    if out is not None:
        return out
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"diversity-{mode_name}.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    mode.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--betas", type=float, nargs="+", default=None, help="GEM betas (default: per mode)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="fine-tune a randomly initialised model instead of the balanced-CE base model",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"where to write the plot (PNG; default {os.path.relpath(RESULTS)}/diversity-<mode>.png, "
        f"gitignored, so a run never writes into the repository root or over docs/img)",
    )
    a = p.parse_args(argv)
    mode_name = "smoke" if a.smoke else "quick" if a.quick else "full"
    a.out = output_path(a.out, mode_name)
    t0 = time.perf_counter()
    result = run(mode_name, a.seed, a.betas, a.from_scratch)
    print(table(result))
    if not result["from_scratch"]:
        print(f"base model (balanced CE): {result['pretrain_seconds']:.1f} s")
    for h in result["histories"]:
        print(f"{h.label}: {h.seconds:.1f} s training+eval via {h.path}")
    plot(result, a.out)
    print(f"plot: {a.out}; total {time.perf_counter() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
