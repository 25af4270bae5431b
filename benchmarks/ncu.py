"""Opt-in DRAM bytes per kernel from Nsight Compute (``python -m benchmarks --ncu`` on a GPU).

For each (provider, shape, table) the parent runs a child process under ``ncu`` that builds the same
inputs, runs one untimed warm-up step, then one forward + backward between
``torch.cuda.profiler.start()`` / ``stop()`` (ncu runs with ``--profile-from-start off``, so only that
step is profiled), and reads ``dram__bytes_read.sum`` + ``dram__bytes_write.sum`` of every kernel it
launched: Triton kernels, cuBLAS matmuls and PyTorch element-wise kernels alike. This is what the
DRAM actually moved (an L2 hit costs nothing here), unlike the logical bytes of the design.
Each child replays every kernel several times, so this takes minutes per provider at GPU shapes.

    python -m benchmarks --ncu --models llama3 --tokens 8192 --providers gem-triton,liger-ce
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")


def ncu_path() -> Optional[str]:
    return shutil.which("ncu")


def parse_csv(text: str) -> List[Tuple[str, int]]:
    """(kernel name, DRAM bytes read + written) per kernel launch, in launch order, from
    ``ncu --csv --print-units base`` output (lines before the CSV header are ncu's own messages)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    launches: Dict[str, List] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if row.get("Metric Name") not in METRICS:
            continue
        value = row.get("Metric Value", "").replace(",", "")
        unit = row.get("Metric Unit", "byte")
        scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(unit, 1)
        entry = launches.setdefault(row["ID"], [row.get("Kernel Name", "?"), 0])
        entry[1] += int(round(float(value) * scale))
    return [(name, total) for name, total in launches.values()]


def measure(provider: str, shape, table: str, dtype: str, timeout_s: int = 1800) -> Tuple[Optional[int], str, List]:
    """(total DRAM bytes or None, note, per-kernel list) of one forward + backward under ncu."""
    exe = ncu_path()
    if exe is None:
        return None, "ncu not found on PATH", []
    cap = shape.softcap or 0
    spec = f"{shape.tokens},{shape.vocab},{shape.hidden},{cap},{shape.ignore_frac}"
    cmd = [
        exe,
        "--csv",
        "--print-units",
        "base",
        "--profile-from-start",
        "off",
        "--metrics",
        ",".join(METRICS),
        sys.executable,
        "-m",
        "benchmarks.ncu",
        "--child",
        provider,
        spec,
        table,
        dtype,
    ]
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    except subprocess.TimeoutExpired:
        return None, f"ncu timed out after {timeout_s} s", []
    kernels = parse_csv(out.stdout)
    if out.returncode != 0 or not kernels:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no kernels profiled"]
        return None, f"ncu failed (rc {out.returncode}): {tail[0][:160]}", kernels
    return sum(b for _, b in kernels), "", kernels


def _child(provider: str, spec: str, table: str, dtype: str) -> int:
    import torch

    from . import providers, runner, shapes

    p = providers.BY_NAME[provider]
    shape = shapes.parse_shape(spec)
    settings = runner.Settings(device="cuda", dtype=getattr(torch, dtype))
    if table == "step":
        fn, args = p.step(shape), runner.make_inputs(shape, settings)
    else:
        fn, args = p.loss(shape), runner.make_logits(shape, settings)
    fn(*args).backward()  # warm-up: compilation and autotuning stay out of the profile
    for t in args:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn(*args).backward()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("PROVIDER", "T,V,H,CAP,FRAC", "TABLE", "DTYPE"), required=True)
    raise SystemExit(_child(*ap.parse_args().child))
