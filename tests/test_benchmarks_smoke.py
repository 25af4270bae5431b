"""Smoke test of ``python -m benchmarks``: every provider runs once at a tiny shape and computes the
right loss, so provider names and call signatures cannot rot; unavailable providers are reported
as skipped with their reason, never passed silently."""
import csv
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import providers, runner
from benchmarks.cli import main
from benchmarks.measure import peak_memory
from benchmarks.shapes import Shape, grid
from gem_kernels.reference import gem_loss_reference

SHAPES = [Shape("tiny", 8, 96, 16), Shape("tiny", 8, 96, 16, softcap=30.0)]
SETTINGS = runner.Settings(device="cpu", dtype=torch.float32, cpu_reps=3, cpu_budget_s=0.0)


def _expected_loss(provider, shape):
    hidden, weight, labels = runner.make_inputs(shape, SETTINGS)
    z = hidden.detach().double() @ weight.detach().double().t()
    if provider.computes == "gem":
        return gem_loss_reference(z, labels, beta=providers.BETA, softcap=shape.softcap).item()
    if shape.softcap:
        z = shape.softcap * torch.tanh(z / shape.softcap)
    return F.cross_entropy(z, labels).item()


@pytest.mark.parametrize("shape", SHAPES, ids=["plain", "softcap"])
@pytest.mark.parametrize("name", [p.name for p in providers.PROVIDERS])
def test_every_provider_runs(name, shape):
    provider = providers.BY_NAME[name]
    records = runner.run(provider, shape, SETTINGS)
    assert [r["phase"] for r in records] == list(runner.PHASES)
    status = {r["status"] for r in records}
    assert len(status) == 1, records
    if status == {"skipped"}:
        pytest.skip(f"{name}: {records[0]['note']}")
    assert status == {"ok"}, records[0]["note"]
    by_phase = {r["phase"]: r for r in records}
    fwd, bwd, both = by_phase["forward"], by_phase["backward"], by_phase["forward+backward"]
    # The loss is the one this provider claims to compute (float32 vs a float64 truth).
    assert fwd["loss"] == pytest.approx(_expected_loss(provider, shape), rel=1e-4, abs=1e-4)
    # Backward produces d hidden and d weight at least: both are allocated inside the measured calls.
    grads = (shape.tokens + shape.vocab) * shape.hidden * 4
    assert both["peak_bytes"] >= grads
    assert both["peak_bytes"] >= max(fwd["peak_bytes"], 0)
    assert both["matmul_flops"] >= 6 * shape.tokens * shape.vocab * shape.hidden  # lm_head fwd + bwd at least
    if provider.triton:  # interpreted here: traffic counted, never timed
        assert both["time_ms_p50"] is None and both["time_note"] == "n/a (interpreter)"
        assert both["traffic_bytes"] == fwd["traffic_bytes"] + bwd["traffic_bytes"] > 0
        assert both["logits_passes"] == pytest.approx(both["traffic_bytes"] / (shape.tokens * shape.vocab * 4))
    else:
        assert both["traffic_bytes"] is None
        for r in records:
            assert 0 < r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]


def test_gem_triton_traffic_is_three_passes():
    """Forward reads the logits once; backward reads them and writes the gradient: ~3 passes."""
    shape = Shape("tiny", 16, 512, 16)
    rec = runner.run(providers.BY_NAME["gem-triton"], shape, SETTINGS, timing=False)[2]
    assert rec["status"] == "ok", rec["note"]
    assert 3.0 <= rec["logits_passes"] <= 3.05


@pytest.mark.parametrize("name", ["torch-ce", "gem-torch", "gem-reference"])
def test_derived_forward_backward_peak_matches_direct(name):
    """runner.combine's max(peak_fwd, end_fwd + peak_bwd) equals measuring forward+backward as one call."""
    shape = Shape("tiny", 32, 256, 16)
    provider = providers.BY_NAME[name]
    rec = runner.run(provider, shape, SETTINGS, timing=False)[2]
    step = provider.step(shape)
    hidden, weight, labels = runner.make_inputs(shape, SETTINGS)
    direct = peak_memory(lambda: step(hidden, weight, labels).backward())
    assert rec["peak_bytes"] == direct.peak_bytes


def test_cpu_grid_keeps_gpu_proportions():
    for cpu, gpu in zip(grid("cpu", which="all"), grid("cuda", which="all")):
        assert cpu.tokens / cpu.hidden == pytest.approx(gpu.tokens / gpu.hidden, rel=0.01)
        assert cpu.vocab / cpu.hidden == pytest.approx(gpu.vocab / gpu.hidden, rel=0.01)
        assert cpu.softcap == gpu.softcap


def test_main_writes_table_csv_and_plots(tmp_path, capsys):
    out = str(tmp_path)
    names = "gem-triton,torch-ce,cce"
    assert main(["--shape", "8,64,16", "--shape", "16,128,16", "--providers", names, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "| gem-triton |" in text and "| torch-ce |" in text and "n/a (interpreter)" in text
    with open(os.path.join(out, "benchmark.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3  # shapes x providers x phases
    assert {r["provider"] for r in rows} == set(names.split(","))
    assert rows[0]["torch"] == torch.__version__ and rows[0]["cpu_cores"] == str(os.cpu_count())
    cce = [r for r in rows if r["provider"] == "cce"]
    assert all(r["status"] == "skipped" and r["note"] for r in cce)
    pytest.importorskip("matplotlib")
    for png in ("memory_vs_vocab.png", "memory_vs_tokens.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_unknown_provider_is_an_error():
    with pytest.raises(ValueError, match="unknown provider"):
        main(["--providers", "nope", "--shape", "8,64,16"])


def test_failing_provider_is_reported_not_raised():
    def build(shape):
        def step(hidden, weight, labels):
            raise ZeroDivisionError("boom")
        return step

    bad = providers.Provider("bad", "always raises", "fused", False, build)
    records = runner.run(bad, Shape("tiny", 8, 64, 16), SETTINGS)
    assert [r["status"] for r in records] == ["failed"] * 3
    assert all(r["note"] == "ZeroDivisionError: boom" for r in records)


@pytest.mark.parametrize("name", ["torch-ce", "liger-flce"])
def test_gpu_flop_count_matches_nested_count(name):
    """The GPU path counts FLOPs in a run of its own (runner._separate_flops); same numbers."""
    shape = Shape("tiny", 8, 64, 16)
    provider = providers.BY_NAME[name]
    if provider.unavailable("cpu", shape):
        pytest.skip(provider.unavailable("cpu", shape))
    fwd, bwd, _ = runner.run(provider, shape, SETTINGS, timing=False)
    separate = runner._separate_flops(provider.step(shape), runner.make_inputs(shape, SETTINGS))
    assert separate == (fwd["matmul_flops"], bwd["matmul_flops"])


def test_help_states_the_cpu_divisor(capsys):
    from benchmarks.shapes import CPU_SCALE

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"divided by {CPU_SCALE} on a CPU" in text
