"""What return_metrics (ce, entropy, token accuracy from the loss's own pass) costs.

    python -m benchmarks.metrics_cost                 # CPU: traffic (interpreter) + torch-path time
    python -m benchmarks.metrics_cost --threads 1

Three measurements, each with the statistics off and on, in the same run:
- traffic: bytes the Triton forward + backward kernels load and store, counted under the Triton
  interpreter (benchmarks.traffic) at a small shape, as passes over the logits. The logits are read
  the same number of times; the only extra bytes are the two more fp32 numbers per row written by
  the forward (8 bytes per row).
- CPU time of the chunked PyTorch path (impl="torch", what CPU users run), forward + backward, calls
  interleaved, best of --repeats, at N x V fp32 (default the torch_path benchmark's 2048 x 32,000).
- GPU time of the Triton kernels (triton.testing.do_bench, forward and forward + backward, bf16
  logits): only when CUDA is available; on a CPU it prints that the figure is pending. Target:
  at most 5% more time with the statistics on.
Interpreter timings are never reported: the interpreter's speed says nothing about a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .runner import LOGITS_HIDDEN, Settings, make_logits
from .shapes import Shape

TRAFFIC_SHAPE = (64, 32000)  # tokens, vocabulary: traffic per row is what matters, and it is exact


def _logits(tokens: int, vocab: int, dtype: torch.dtype, device: str = "cpu"):
    """Logits [tokens, vocab] (not requiring grad) and labels from the main harness's input factory."""
    z, y = make_logits(Shape("custom", tokens, vocab, LOGITS_HIDDEN), Settings(device=device, dtype=dtype))
    return z.detach(), y


def _traffic_rows() -> list:
    """Runs in a child process with TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    from benchmarks.traffic import count_traffic
    from gem_kernels import gem_loss

    n, v = TRAFFIC_SHAPE
    z, y = _logits(n, v, torch.bfloat16)
    rows = []
    for metrics in (False, True):
        x = z.clone().requires_grad_()

        def step(x=x, metrics=metrics):
            out = gem_loss(x, y, impl="triton", return_metrics=metrics)
            (out[0] if isinstance(out, tuple) else out).backward()

        rep = count_traffic(step)
        rows.append((metrics, rep.loaded_bytes, rep.stored_bytes, rep.passes(n * v, 2)))
    return rows


def traffic_table() -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import json; from benchmarks.metrics_cost import _traffic_rows; print(json.dumps(_traffic_rows()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    n, v = TRAFFIC_SHAPE
    lines = [
        f"traffic, Triton forward + backward (interpreter byte count), bf16 logits [{n}, {v}]:",
        "| return_metrics | loaded bytes | stored bytes | passes over the logits |",
        "|---|---:|---:|---:|",
    ]
    for metrics, loaded, stored, passes in rows:
        lines.append(f"| {metrics} | {loaded:,} | {stored:,} | {passes:.5f} |")
    extra = (rows[1][1] + rows[1][2]) - (rows[0][1] + rows[0][2])
    lines.append(f"extra with the statistics: {extra:,} bytes = {extra / n:.1f} bytes per row")
    return "\n".join(lines)


# (label, gem_loss options): the default call, the CE alone (what the trainers logged before), and
# the three statistics.
TIME_CASES = (
    ("default", {}),
    ("return_ce=True", {"return_ce": True}),
    ("return_metrics=True", {"return_metrics": True}),
)


def _step(z, y, options):
    from gem_kernels import gem_loss

    out = gem_loss(z, y, impl="torch", **options)
    (out[0] if isinstance(out, tuple) else out).backward()


def torch_time_table(tokens: int, vocab: int, repeats: int) -> str:
    z, y = _logits(tokens, vocab, torch.float32)
    times = {label: [] for label, _ in TIME_CASES}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for label, options in TIME_CASES:
            x = z.clone().requires_grad_()
            t0 = time.perf_counter()
            _step(x, y, options)
            times[label].append(time.perf_counter() - t0)
    best = {label: min(ts[1:]) for label, ts in times.items()}
    lines = [
        f"CPU wall time, impl='torch', forward + backward, fp32 [{tokens}, {vocab}], "
        f"{torch.get_num_threads()} torch threads, best of {repeats}, calls interleaved:",
        "| call | ms | x default |",
        "|---|---:|---:|",
    ]
    for label, _ in TIME_CASES:
        lines.append(f"| {label} | {best[label] * 1e3:.1f} | {best[label] / best['default']:.3f} |")
    return "\n".join(lines)


def gpu_time_table(tokens: int, vocab: int) -> str:
    if not torch.cuda.is_available():
        return "GPU time of the Triton kernels: pending (no CUDA device here; rerun this command on a GPU)."
    import triton.testing

    from gem_kernels import gem_loss

    z, y = _logits(tokens, vocab, torch.bfloat16, device="cuda")
    lines = [
        f"GPU time ({torch.cuda.get_device_name()}), impl='triton', bf16 [{tokens}, {vocab}], "
        "triton.testing.do_bench median ms:",
        "| return_metrics | forward | forward + backward |",
        "|---|---:|---:|",
    ]
    res = {}
    for metrics in (False, True):

        def fwd(metrics=metrics):
            with torch.no_grad():
                gem_loss(z, y, impl="triton", return_metrics=metrics)

        def fwd_bwd(metrics=metrics):
            x = z.detach().requires_grad_()
            out = gem_loss(x, y, impl="triton", return_metrics=metrics)
            (out[0] if isinstance(out, tuple) else out).backward()

        res[metrics] = (triton.testing.do_bench(fwd), triton.testing.do_bench(fwd_bwd))
        lines.append(f"| {metrics} | {res[metrics][0]:.3f} | {res[metrics][1]:.3f} |")
    lines.append(
        f"extra time with the statistics: forward {res[True][0] / res[False][0] - 1:+.1%}, "
        f"forward + backward {res[True][1] / res[False][1] - 1:+.1%} (target <= +5%)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--gpu-tokens", type=int, default=8192)
    p.add_argument("--gpu-vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-traffic", action="store_true", help="skip the interpreter traffic count")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.skip_traffic:
        print(traffic_table(), end="\n\n")
    print(torch_time_table(a.tokens, a.vocab, a.repeats), end="\n\n")
    print(gpu_time_table(a.gpu_tokens, a.gpu_vocab))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
