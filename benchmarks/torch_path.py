"""The chunked PyTorch path against torch's own F.cross_entropy on the same CPU, in the same run.

    python -m benchmarks.torch_path                  # N=2048, V=32,000, fp32: the issue's target shape
    python -m benchmarks.torch_path --threads 1

Reports forward+backward wall time (best of --repeats, calls interleaved so both see the same
machine) and peak extra memory (allocations tracked by torch.profiler, in units of N*V*4 bytes).
Targets: GEM time <= 1.25 x CE time, GEM peak extra <= 1.25 x N*V*4.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gem_kernels import gem_loss

from .measure import peak_memory


def _ce(logits, labels):
    F.cross_entropy(logits, labels).backward()


def _gem(logits, labels, **options):
    gem_loss(logits, labels, impl="torch", **options).backward()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.tokens, a.vocab, generator=g) * 3
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    cases = {
        "torch F.cross_entropy": (_ce, {}),
        "gem_loss(impl='torch')": (_gem, {}),
        "gem_loss(impl='torch', h='logsigmoid')": (_gem, {"h": "logsigmoid"}),
        "gem_loss(impl='torch', inplace_backward=True)": (_gem, {"inplace_backward": True}),
    }
    times = {k: [] for k in cases}
    for _ in range(a.repeats + 1):  # the first round warms up and is dropped
        for name, (fn, kw) in cases.items():
            x = z.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x, y, **kw)
            times[name].append(time.perf_counter() - t0)
    nv = a.tokens * a.vocab * 4
    print(f"N={a.tokens} V={a.vocab} fp32, {torch.get_num_threads()} torch threads, best of {a.repeats}")
    print("| call (forward + backward) | time ms | x CE time | peak extra (x N*V*4 bytes) |")
    print("|---|---:|---:|---:|")
    ce_best = min(times["torch F.cross_entropy"][1:])
    for name, (fn, kw) in cases.items():
        best = min(times[name][1:])
        x = z.clone().requires_grad_()
        mem = peak_memory(fn, x, y, **kw)
        print(f"| {name} | {best * 1e3:.1f} | {best / ce_best:.2f} | {mem.peak_bytes / nv:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
