"""benchmarks.measure.peak_memory keeps the profiler's C++ start/stop lines (``USDT ...
profiler_start``) out of a command's output, which the Markdown tables of benchmarks.core_figures
and benchmarks.torch_path are part of, while what the measured call itself prints stays visible."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import sys, torch
from benchmarks.measure import peak_memory
def fn():
    print("inside the call", file=sys.stderr, flush=True)
    return torch.ones(1000)
for _ in range(3):
    peak_memory(fn)
print("| a | table |")
"""


def test_no_profiler_lines_in_the_output():
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert out.returncode == 0, out.stdout
    assert "USDT" not in out.stdout and "profiler_start" not in out.stdout, out.stdout
    assert out.stdout.count("inside the call") == 3 and "| a | table |" in out.stdout
