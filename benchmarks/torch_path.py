"""The chunked PyTorch path against torch's own F.cross_entropy on the same CPU, in the same run.

    python -m benchmarks.torch_path                  # N=2048, V=32,000, fp32
    python -m benchmarks.torch_path --threads 1

The default N and V are the CPU shape of the torch path's targets below. A thin entry point of the
main harness: the calls are the loss-on-logits form of providers in ``benchmarks.providers``
(``torch-ce``, ``gem-torch``, ``gem-torch-logsigmoid``, ``gem-torch-inplace``) on the logits of
``benchmarks.runner.make_logits``. Reports forward+backward wall time (best of --repeats, calls
interleaved so all see the same machine) and peak extra memory (allocations tracked by
torch.profiler, in units of N*V*4 bytes).
Targets: GEM time <= 1.25 x CE time, GEM peak extra <= 1.25 x N*V*4.
"""

from __future__ import annotations

import argparse
import time

import torch

from .measure import peak_memory
from .providers import BY_NAME
from .runner import Settings, make_logits
from .shapes import Shape

# (label, provider): the rows of the table; the first is the CE every row is compared with.
CALLS = (
    ("torch F.cross_entropy", "torch-ce"),
    ("gem_loss(impl='torch')", "gem-torch"),
    ("gem_loss(impl='torch', h='logsigmoid')", "gem-torch-logsigmoid"),
    ("gem_loss(impl='torch', inplace_backward=True)", "gem-torch-inplace"),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the matmul that makes the logits")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = Shape("custom", a.tokens, a.vocab, a.hidden)
    z, y = make_logits(shape, Settings(device="cpu", dtype=torch.float32))
    z = z.detach()
    cases = {}
    for name, provider in CALLS:
        loss = BY_NAME[provider].loss(shape)
        cases[name] = lambda x, y, loss=loss: loss(x, y).backward()
    times = {k: [] for k in cases}
    for _ in range(a.repeats + 1):  # the first round warms up and is dropped
        for name, fn in cases.items():
            x = z.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(x, y)
            times[name].append(time.perf_counter() - t0)
    nv = a.tokens * a.vocab * 4
    print(f"N={a.tokens} V={a.vocab} fp32, {torch.get_num_threads()} torch threads, best of {a.repeats}")
    print("| call (forward + backward) | time ms | x CE time | peak extra (x N*V*4 bytes) |")
    print("|---|---:|---:|---:|")
    ce_best = min(times["torch F.cross_entropy"][1:])
    for name, fn in cases.items():
        best = min(times[name][1:])
        x = z.clone().requires_grad_()
        mem = peak_memory(fn, x, y)
        print(f"| {name} | {best * 1e3:.1f} | {best / ce_best:.2f} | {mem.peak_bytes / nv:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
