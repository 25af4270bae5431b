"""torch.compile(fullgraph=True) against eager, for both entry points on the torch path (CPU).

    python -m benchmarks.compile_vs_eager                 # N=2048, V=32,000 (fused: H=256), fp32
    python -m benchmarks.compile_vs_eager --threads 1

For each entry point (the providers ``gem-torch``, loss on given logits, and ``gem-fused-torch``,
lm_head step, of ``benchmarks.providers``, on the inputs of ``benchmarks.runner``): the largest
difference between compiled and eager loss and gradients (forward + backward, mean reduction,
a quarter of the labels ignored), the time of the first compiled call (tracing + inductor), and
the forward + backward wall time of eager and compiled calls (best of --repeats, calls
interleaved). CPU code paths only: on a GPU the compiled Triton path is what matters, and it is
not measured here.
"""

from __future__ import annotations

import argparse
import time

import torch

from .providers import BY_NAME
from .runner import Settings, make_inputs, make_logits
from .shapes import Shape

IGNORED = 0.25  # share of labels set to -100


def _step(fn, inputs):
    xs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    loss = fn(*xs)
    grads = torch.autograd.grad(loss, [t for t in xs if t.requires_grad])
    return loss.detach(), grads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = Shape("custom", a.tokens, a.vocab, a.hidden, None, IGNORED)
    settings = Settings(device="cpu", dtype=torch.float32)
    cases = {
        "gem_loss(impl='torch')": (BY_NAME["gem-torch"].loss(shape), make_logits(shape, settings)),
        "fused_linear_gem_loss(impl='torch')": (BY_NAME["gem-fused-torch"].step(shape), make_inputs(shape, settings)),
    }
    print(
        f"N={a.tokens} V={a.vocab} H={a.hidden} fp32, mean, 25% ignored, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, best of {a.repeats}"
    )
    print(
        "| entry point | max abs diff loss / grads (compiled - eager) | first compiled call s | eager ms | "
        "compiled ms | compiled / eager |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, (fn, inputs) in cases.items():
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        t0 = time.perf_counter()
        c_loss, c_grads = _step(compiled, inputs)
        first = time.perf_counter() - t0
        e_loss, e_grads = _step(fn, inputs)
        diffs = [(c_loss - e_loss).abs().max().item()] + [(c - e).abs().max().item() for c, e in zip(c_grads, e_grads)]
        times = {"eager": [], "compiled": []}
        for _ in range(a.repeats):
            for which, f in (("eager", fn), ("compiled", compiled)):
                t0 = time.perf_counter()
                _step(f, inputs)
                times[which].append(time.perf_counter() - t0)
        te, tc = min(times["eager"]) * 1e3, min(times["compiled"]) * 1e3
        print(
            f"| `{name}` | {' / '.join(f'{d:.1e}' for d in diffs)} | {first:.1f} | {te:.1f} | {tc:.1f} | "
            f"{tc / te:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
