"""Documented memory figures match what their command prints today.

README.md and docs/benchmarks.md quote peak forward+backward memory of ``python -m benchmarks`` at
the CPU-scaled Llama-3 shape. Each such table follows a marker naming its command, table and shape:

    <!-- memory-figures: python -m benchmarks | table=step | T=128 V=1002 H=32 -->

This test re-measures every provider of every marked table at that shape (one provider run each,
no timing: about a second per provider on the CPU) and fails when a documented figure is off by
more than 2 % (+0.01 MiB for rounding), e.g. after a change to a code path or to the harness.
Regenerate the figures with the command and update the tables when it fails.
"""

import os
import re

import pytest
import torch
from helpers import only_on

from benchmarks import providers, runner
from benchmarks.shapes import Shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/benchmarks.md")
MARKER = re.compile(
    r"<!-- memory-figures: (?P<cmd>[^|]+)\| table=(?P<table>\w+) \| T=(?P<T>\d+) V=(?P<V>\d+) "
    r"H=(?P<H>\d+) -->"
)
pytestmark = only_on("cpu", "the documented figures are those of the CPU run (float32, scaled shapes)")


def documented():
    """[(file, table, shape, provider, MiB)] of every marked table."""
    out = []
    for name in DOCS:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for m in MARKER.finditer(text):
            shape = Shape("llama3/128", int(m["T"]), int(m["V"]), int(m["H"]))
            lines = text[m.end() :].lstrip("\n").splitlines()
            header = [c.strip() for c in lines[0].strip("|").split("|")]
            col = header.index("peak fwd+bwd MiB")
            for line in lines[2:]:
                if not line.startswith("|"):
                    break
                cells = [c.strip() for c in line.strip("|").split("|")]
                provider = cells[0].split()[0].strip("`")
                out.append((name, m["table"], shape, provider, float(cells[col])))
    return out


FIGURES = documented()


def test_the_docs_have_marked_figures():
    assert {f for f, *_ in FIGURES} == set(DOCS), "a memory-figures marker went missing"
    assert all(p in providers.BY_NAME for _, _, _, p, _ in FIGURES), [p for *_, p, _ in FIGURES]


_MEASURED = {}


def _measure(table, shape, name):
    key = (table, shape, name)
    if key not in _MEASURED:
        provider = providers.BY_NAME[name]
        settings = runner.Settings(device="cpu", dtype=torch.float32)
        runner.run(provider, Shape("warm-up", 8, 96, 16), settings, timing=False, table=table)  # first-call state
        rec = runner.run(provider, shape, settings, timing=False, table=table)[2]
        assert rec["status"] == "ok", rec["note"]
        _MEASURED[key] = rec["peak_bytes"] / 2**20
    return _MEASURED[key]


@pytest.mark.parametrize("doc,table,shape,name,mib", FIGURES, ids=[f"{d}:{n}" for d, _, _, n, _ in FIGURES])
def test_documented_peak_matches_the_command(doc, table, shape, name, mib):
    got = _measure(table, shape, name)
    assert abs(got - mib) <= 0.02 * mib + 0.01, (
        f"{doc}: {name} peak fwd+bwd documented as {mib} MiB, the command now gives {got:.2f} MiB "
        f"({shape.label}, {table} table); rerun `python -m benchmarks` and update the table"
    )


def _table_mib(path, row_start):
    """The first MiB figure of the table row starting with ``row_start`` in ``path``."""
    with open(os.path.join(ROOT, path)) as f:
        for line in f:
            if line.startswith(row_start):
                return float(re.search(r"\| ([\d.]+) MiB \|", line).group(1))
    raise AssertionError(f"{path}: no row starting with {row_start!r}")


def test_integration_step_memory_matches_its_command():
    """docs/integrations.md#memory: its own command block, run as written (about 20 s), prints the
    peaks that it and the README quote."""
    import subprocess
    import sys

    with open(os.path.join(ROOT, "docs/integrations.md")) as f:
        text = f.read()
    code = re.search(r"PYTHONPATH=\. python - <<'EOF'\n(.*?)\nEOF\n", text, re.S).group(1)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)  # the command as a user runs it
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    got = {k: float(v) for k, v in re.findall(r"(logits|fused) path:\s+peak ([\d.]+) MiB", out.stdout)}
    assert set(got) == {"logits", "fused"}, out.stdout
    for doc in ("README.md", "docs/integrations.md"):
        rows = (("logits", "| logits path (`gem_compute_loss_func`)"), ("fused", "| fused path (`apply_gem`)"))
        for key, row in rows:
            mib = _table_mib(doc, row)
            assert abs(got[key] - mib) <= 0.02 * mib + 0.01, (
                f"{doc}: {key} path peak documented as {mib} MiB, its command now prints {got[key]} MiB"
            )
