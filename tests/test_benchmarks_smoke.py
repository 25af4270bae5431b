"""Smoke test of ``python -m benchmarks``: every provider runs once at a tiny shape in each of its
tables and computes the right loss, so provider names and call signatures cannot rot; unavailable
providers are reported as skipped with their reason, never passed silently; the logical-bytes
models match what the interpreter counts; the derived columns and the Nsight Compute parser are
checked on constructed input."""

import csv
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, only_on

from benchmarks import ncu, providers, roofline, runner
from benchmarks.cli import main
from benchmarks.measure import peak_memory
from benchmarks.shapes import Shape, grid
from gem_kernels.reference import gem_loss_reference

SHAPES = {
    "plain": Shape("tiny", 8, 96, 16),
    "softcap": Shape("tiny", 8, 96, 16, softcap=30.0),
    "masked": Shape("tiny", 8, 96, 16, ignore_frac=0.5),
}
CASES = [("plain", "loss"), ("plain", "step"), ("softcap", "step"), ("masked", "loss"), ("masked", "step")]
# The test device: on a GPU the Triton providers run compiled and are timed (no interpreter counts).
SETTINGS = runner.Settings(device=DEVICE, dtype=torch.float32, cpu_reps=3, cpu_budget_s=0.0)
CPU_RUN = only_on("cpu", "checks what the CPU run shows (interpreter counts, no Triton timings)")


def _expected_loss(provider, shape):
    hidden, weight, labels = runner.make_inputs(shape, SETTINGS)
    z = hidden.detach().double() @ weight.detach().double().t()
    if provider.computes == "gem":
        return gem_loss_reference(z, labels, beta=providers.BETA, h=provider.h, softcap=shape.softcap).item()
    if shape.softcap:
        z = shape.softcap * torch.tanh(z / shape.softcap)
    return F.cross_entropy(z, labels).item()


RUNS = [(p.name, case) for case in CASES for p in providers.PROVIDERS if case[1] == "step" or p.in_loss_table]


@pytest.mark.parametrize("name,case", RUNS, ids=[f"{n}-{s}-{t}" for n, (s, t) in RUNS])
def test_every_provider_runs(name, case):
    provider = providers.BY_NAME[name]
    shape, table = SHAPES[case[0]], case[1]
    records = runner.run(provider, shape, SETTINGS, table=table)
    assert [r["phase"] for r in records] == list(runner.PHASES)
    assert {r["table"] for r in records} == {table} and records[0]["valid_tokens"] == shape.valid
    status = {r["status"] for r in records}
    assert len(status) == 1, records
    if status == {"skipped"}:
        pytest.skip(f"{name}: {records[0]['note']}")
    assert status == {"ok"}, records[0]["note"]
    by_phase = {r["phase"]: r for r in records}
    fwd, bwd, both = by_phase["forward"], by_phase["backward"], by_phase["forward+backward"]
    # The loss is the one this provider claims to compute (float32 vs a float64 truth).
    assert fwd["loss"] == pytest.approx(_expected_loss(provider, shape), rel=1e-4, abs=1e-4)
    assert both["peak_bytes"] >= max(fwd["peak_bytes"], 0)
    if table == "step":
        # Backward produces d hidden and d weight at least: both are allocated inside the measured calls.
        assert both["peak_bytes"] >= (shape.tokens + shape.vocab) * shape.hidden * 4
        if provider.count_flops:
            assert both["matmul_flops"] >= 6 * shape.valid * shape.vocab * shape.hidden  # lm_head fwd + bwd
    logits_bytes = shape.tokens * shape.vocab * 4
    if provider.bytes_model:
        assert both["model_bytes"] == fwd["model_bytes"] + bwd["model_bytes"] > 0
    if DEVICE == "cuda":  # compiled: every provider timed, nothing counted without --ncu
        for r in records:
            assert 0 < r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
        return
    if provider.triton:  # interpreted here: traffic counted, never timed
        assert both["time_ms_p50"] is None and both["time_note"] == "n/a (interpreter)"
        assert both["traffic_bytes"] == fwd["traffic_bytes"] + bwd["traffic_bytes"] > 0
        assert both["logits_passes"] == pytest.approx(both["traffic_bytes"] / logits_bytes)
    if provider.triton and provider.bytes_model:
        # The logical bytes a GPU run reports are what the interpreter counts, up to per-token terms.
        for r in records:
            slack = roofline.PER_TOKEN_BOUND * shape.tokens
            assert r["model_bytes"] <= r["traffic_bytes"] <= r["model_bytes"] + slack, (r["phase"], r)
    if not provider.triton:
        assert both["traffic_bytes"] is None
        for r in records:
            assert 0 < r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]


@CPU_RUN
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
    direct = peak_memory(lambda: step(hidden, weight, labels).backward(), device=SETTINGS.device)
    assert rec["peak_bytes"] == direct.peak_bytes


def test_cpu_grid_keeps_gpu_proportions():
    for cpu, gpu in zip(grid("cpu", which="all"), grid("cuda", which="all")):
        assert cpu.tokens / cpu.hidden == pytest.approx(gpu.tokens / gpu.hidden, rel=0.01)
        assert cpu.vocab / cpu.hidden == pytest.approx(gpu.vocab / gpu.hidden, rel=0.01)
        assert cpu.softcap == gpu.softcap


@CPU_RUN
def test_main_writes_table_csv_and_plots(tmp_path, capsys):
    out = str(tmp_path)
    names = "gem-triton,torch-ce,cce"
    shapes = ["8,64,16", "16,64,16", "8,128,16", "16,64,16,0,0.5"]
    assert main([a for s in shapes for a in ("--shape", s)] + ["--providers", names, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "| gem-triton |" in text and "| torch-ce |" in text and "n/a (interpreter)" in text
    assert text.count("### loss on given logits") == text.count("### lm_head step") == len(shapes)
    assert "8 of 16 labels ignored" in text and "Measured in this run: copy bandwidth" in text
    with open(os.path.join(out, "benchmark.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(shapes) * (3 + 2) * 3  # shapes x (step providers + loss providers) x phases
    assert {r["provider"] for r in rows} == set(names.split(","))
    ce = [r for r in rows if r["provider"] == "torch-ce" and r["phase"] == "forward+backward"]
    assert all(float(r["x_fastest_ce"]) == 1.0 for r in ce)  # the only timed CE provider on a CPU
    assert all(float(r["floor_fraction"]) > 0 for r in ce if r["table"] == "step")
    assert rows[0]["torch"] == torch.__version__ and rows[0]["cpu_cores"] == str(os.cpu_count())
    cce = [r for r in rows if r["provider"] == "cce"]
    assert all(r["status"] == "skipped" and r["note"] for r in cce)
    pytest.importorskip("matplotlib")
    redrawn = os.path.join(out, "redrawn")
    assert main(["--plots-from", os.path.join(out, "benchmark.csv"), "--out", redrawn]) == 0
    for folder in (out, redrawn):
        for png in ("memory_vs_vocab.png", "memory_vs_tokens.png"):
            with open(os.path.join(folder, png), "rb") as f:
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


def _record(provider, table, phase, ms, **kw):
    r = {
        "provider": provider,
        "table": table,
        "shape": "s",
        "phase": phase,
        "status": "ok",
        "time_ms_p50": ms,
        "model_bytes": None,
        "valid_tokens": 10,
        "hidden": 4,
        "vocab": 100,
        "achieved_bytes_per_s": None,
        "copy_fraction": None,
        "matmul_floor_ms": None,
        "floor_fraction": None,
        "x_fastest_ce": None,
    }
    r.update(kw)
    return r


def test_derived_columns():
    calib = roofline.Calibration(
        "cpu", copy_bytes_per_s=1e9, copy_buffer_bytes=1, matmul_flops_per_s={"s": 6 * 10 * 4 * 100 / 1e-3}
    )  # floor: 1 ms for fwd+bwd
    recs = [
        _record("torch-ce", "step", "forward+backward", 4.0),
        _record("liger-ce", "step", "forward+backward", 2.0),
        _record("gem-triton", "step", "forward+backward", 3.0),
        _record("gem-triton", "loss", "forward+backward", 2.0, model_bytes=10**6),
        _record("torch-ce", "loss", "forward+backward", None),
    ]
    roofline.derive(recs, calib, ["torch-ce", "liger-ce"])
    assert recs[2]["x_fastest_ce"] == pytest.approx(1.5) and recs[2]["fastest_ce"] == "liger-ce"
    assert recs[1]["x_fastest_ce"] == 1.0 and recs[0]["x_fastest_ce"] == 2.0
    assert recs[2]["floor_fraction"] == pytest.approx(1 / 3)
    assert recs[3]["achieved_bytes_per_s"] == pytest.approx(5e8) and recs[3]["copy_fraction"] == pytest.approx(0.5)
    assert recs[3]["x_fastest_ce"] is None  # no timed CE provider in the loss table
    assert recs[3]["floor_fraction"] is None  # the matmul floor belongs to the step table


def test_bytes_models():
    m = roofline.model_bytes("gem-triton", tokens=10, valid=4, vocab=100, element_size=2)
    assert m == {"forward": 3600, "backward": 0, "forward+backward": 3600}  # gradient in forward
    assert roofline.model_bytes("liger-ce", 10, 10, 100, 2)["forward+backward"] == 3 * 10 * 100 * 2
    assert roofline.model_bytes(None, 10, 10, 100, 2) == {}
    named = {p.bytes_model for p in providers.PROVIDERS if p.bytes_model}
    assert named <= set(roofline.BYTES_MODELS) and named <= set(roofline.BYTES_SOURCES)


NCU_COLUMNS = (
    "ID",
    "Process ID",
    "Process Name",
    "Host Name",
    "Kernel Name",
    "Context",
    "Stream",
    "Block Size",
    "Grid Size",
    "Device",
    "CC",
    "Section Name",
    "Metric Name",
    "Metric Unit",
    "Metric Value",
)


def _ncu_line(launch, kernel, grid, metric, unit, value):
    """One CSV line as ``ncu --csv --print-units base`` prints it (every field quoted)."""
    fields = (
        launch,
        "123",
        "python",
        "h",
        kernel,
        "1",
        "7",
        "(256, 1, 1)",
        grid,
        "0",
        "9.0",
        "Command line profiler metrics",
        metric,
        unit,
        value,
    )
    return ",".join(f'"{f}"' for f in fields)


NCU_CSV = (
    "\n".join(
        [
            "==PROF== Connected to process 123",
            '==PROF== Profiling "gem_fwd": 0%....50%....100% - 9 passes',
            ",".join(f'"{c}"' for c in NCU_COLUMNS),
            _ncu_line("0", "gem_fwd_kernel", "(8192, 1, 1)", "dram__bytes_read.sum", "byte", "2,101,346,304"),
            _ncu_line("0", "gem_fwd_kernel", "(8192, 1, 1)", "dram__bytes_write.sum", "byte", "196,608"),
            _ncu_line("1", "gem_bwd_kernel", "(8192, 32, 1)", "dram__bytes_read.sum", "Mbyte", "2101.5"),
            _ncu_line("1", "gem_bwd_kernel", "(8192, 32, 1)", "dram__bytes_write.sum", "byte", "2101346304"),
        ]
    )
    + "\n"
)


def test_ncu_csv_parser():
    kernels = ncu.parse_csv(NCU_CSV)
    assert kernels == [("gem_fwd_kernel", 2_101_346_304 + 196_608), ("gem_bwd_kernel", 2_101_500_000 + 2_101_346_304)]
    assert ncu.parse_csv("==PROF== no kernels were profiled") == []


@CPU_RUN
def test_ncu_flag_on_cpu_is_a_clear_skip(tmp_path, capsys):
    assert main(["--shape", "8,64,16", "--providers", "torch-ce", "--ncu", "--no-plots", "--out", str(tmp_path)]) == 0
    assert "--ncu: skipped (Nsight Compute profiles GPU kernels" in capsys.readouterr().err


def test_masked_grid_and_shape_parsing():
    shapes = grid("cuda")
    masked = [s for s in shapes if s.ignore_frac]
    assert len(masked) == 1 and masked[0].model == "llama3" and masked[0].tokens == 8192
    assert masked[0].valid == 4096 and "masked=50%" in masked[0].label
    assert not any(s.ignore_frac for s in grid("cuda", masked=False))
    assert not any(s.ignore_frac for s in grid("cpu", which="quick"))
    from benchmarks.shapes import parse_shape

    assert parse_shape("16,64,8,0,0.25").ignored == 4 and parse_shape("16,64,8,30").softcap == 30.0
    with pytest.raises(ValueError, match="ignore_frac"):
        parse_shape("16,64,8,0,1.0")
    _, _, labels = runner.make_inputs(parse_shape("16,64,8,0,0.25"), SETTINGS)
    assert int((labels == -100).sum()) == 4
