"""examples/diversity.py: the metrics are right on models with known output distributions, and the
--smoke run trains CE and GEM end to end and reports finite, in-range metrics. The scientific
outcome (does GEM keep more diversity?) is not asserted here; docs/diversity.md reports it."""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "diversity.py"
_spec = importlib.util.spec_from_file_location("diversity_example", _PATH)
div = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = div  # dataclasses look their module up there
_spec.loader.exec_module(div)

KEYS = {"entropy", "distinct", "accuracy"}


class _FixedModel(torch.nn.Module):
    """Next-token logits that depend only on the category and on how many answer tokens exist:
    ``first[c]`` scores the first answer token, ``second[c][w]`` the second after first word w."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, input_ids):
        rows = []
        for ids in input_ids.tolist():
            c = div.category_of(ids)
            rows.append(self.first[c] if len(ids) == div.PROMPT_LEN else self.second[c][ids[-1]])
        return type("Out", (), {"logits": torch.stack(rows)[:, None, :]})()


def _model(task, weights, valid_second=True):
    """First token: log(weights) on the category's 4 first words, -inf-like elsewhere; second token:
    the matching valid second word (or an invalid token when valid_second=False)."""
    neg = -1e4
    first, second = [], []
    for answers in task.valid:
        f = torch.full((div.VOCAB_SIZE,), neg)
        table = {}
        for (a, b), w in zip(answers, weights):
            f[a] = math.log(w)
            s = torch.full((div.VOCAB_SIZE,), neg)
            s[b if valid_second else div.SEP] = 0.0
            table[a] = s
        first.append(f)
        second.append(table)
    return _FixedModel(first, second)


@pytest.mark.parametrize(
    "weights, valid_second, expected",
    [
        # uniform over the 4 valid answers: entropy (ln 4 + 0) / 2, every sample valid, all 4 seen in 64 draws
        ((0.25, 0.25, 0.25, 0.25), True, {"entropy": math.log(4) / 2, "distinct": 4.0, "accuracy": 1.0}),
        # one answer only: zero entropy, one distinct answer
        ((1.0, 1e-30, 1e-30, 1e-30), True, {"entropy": 0.0, "distinct": 1.0, "accuracy": 1.0}),
        # right first words, wrong second word: nothing is valid
        ((0.5, 0.5, 1e-30, 1e-30), False, {"entropy": math.log(2) / 2, "distinct": 0.0, "accuracy": 0.0}),
    ],
)
def test_metrics_on_known_distributions(weights, valid_second, expected):
    task = div.make_task(0)
    prompts = div.make_prompts(2, torch.Generator().manual_seed(1))
    got = div.diversity_metrics(_model(task, weights, valid_second), task, prompts, num_samples=64, seed=0)
    assert set(got) == KEYS
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-3), (key, got)


def test_task_data_follow_the_task_definition():
    """examples/diversity.py's task: distinct prompts, held-out prompts never trained on, each
    category's answers in 60/25/10/5 % shares, prompt tokens ignored, ids inside the vocabulary."""
    task = div.make_task(0)
    g = torch.Generator().manual_seed(0)
    data, prompts = div.make_train_set(task, 20, div.TRAIN_SHARES, g)
    heldout = div.make_prompts(4, g, exclude=frozenset(prompts))
    assert not set(heldout) & set(prompts) and len(set(prompts)) == len(prompts)
    for c in range(div.NUM_CATEGORIES):
        answers = [tuple(ex["input_ids"][div.PROMPT_LEN :].tolist()) for ex in data[c * 20 : (c + 1) * 20]]
        assert [answers.count(a) for a in task.valid[c]] == [12, 5, 2, 1]  # 60/25/10/5 %
    ex = data[0]
    assert (ex["labels"][: div.PROMPT_LEN] == -100).all()
    assert torch.equal(ex["labels"][div.PROMPT_LEN :], ex["input_ids"][div.PROMPT_LEN :])
    assert int(max(ex["input_ids"].max() for ex in data)) < div.VOCAB_SIZE


def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "diversity.png"
    result = div.main(["--smoke", "--out", str(out)])
    setting = result["setting"]
    hist = result["histories"]
    assert [h.label for h in hist] == ["CE", "GEM beta=0.7"]
    assert "GEMTrainer" in hist[1].path  # the GEM run went through the package's Trainer integration
    for h in hist:
        assert h.steps == [0, 3, 6]
        for m in h.metrics:
            assert set(m) == KEYS
            assert all(math.isfinite(v) for v in m.values())
            assert 0.0 <= m["entropy"] <= math.log(div.VOCAB_SIZE) + 1e-6
            assert 0.0 <= m["distinct"] <= min(div.ANSWERS_PER_CATEGORY, setting.samples)
            assert 0.0 <= m["accuracy"] <= 1.0
    # GEMTrainer logged the training entropy (from the loss's own pass) at every checkpoint; CE did not
    assert hist[0].train == [] and [step for step, _, _ in hist[1].train] == [3, 6]
    for _, ent, acc in hist[1].train:
        assert 0.0 < ent <= math.log(div.VOCAB_SIZE) + 1e-6 and 0.0 <= acc <= 1.0
    # both runs start from the same base model; the different losses then move it differently
    assert hist[0].metrics[0] == hist[1].metrics[0]
    assert hist[0].metrics[-1]["entropy"] != hist[1].metrics[-1]["entropy"]
    assert out.stat().st_size > 1000


def test_default_plot_path_is_not_the_repository_root():
    """`python examples/diversity.py --quick` from the repository root used to write diversity.png there."""
    root = pathlib.Path(_PATH).resolve().parent.parent
    path = pathlib.Path(div.output_path(None, "quick")).resolve()
    assert path.parent == root / "examples" / "results" and path.name == "diversity-quick.png"
    assert div.output_path("x/y.png", "quick") == "x/y.png"
    ignored = (root / ".gitignore").read_text().split()
    assert "examples/results/" in ignored
