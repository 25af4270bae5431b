"""Peak memory and matmul FLOPs of the lm_head step (fused or not), forward + backward, on CPU.

A thin entry point of the main harness: it selects providers of ``benchmarks.providers`` (by default
gem_kernels.fused_linear_gem_loss with impl "torch" and "triton", the latter through the Triton
interpreter, Liger-Kernel's fused linear cross-entropy, also interpreted, and the naive
``gem_loss_reference(hidden @ W.T)``) and one custom shape, builds the inputs with
``benchmarks.runner.make_inputs`` and measures each provider's lm_head step with
``benchmarks.runner.run`` (the "step" table of ``python -m benchmarks``: peak memory above the
inputs, largest single allocation, matmul FLOPs; the returned .grad tensors count). Every provider
is first run once at a tiny shape, so state a first call leaves behind stays out of the figures.

    python -m benchmarks.fused_memory --tokens 4096 --hidden 256 --vocab 32000 --ignore-frac 0.5
    python -m benchmarks.fused_memory --providers gem-fused,gem-fused-torch-lowmem --dtype bfloat16

Interpreter timings are not kernel speed and are not reported (``--time`` times the providers that
run no Triton kernel).
"""

from __future__ import annotations

import argparse
import json

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_PROVIDERS = "gem-fused-torch,gem-fused,liger-flce,gem-reference"
WARM_UP = (64, 500)  # tokens, vocabulary of the first, unmeasured call of each provider


def measure(provider, shape, settings, timing: bool = False) -> dict:
    """The forward+backward record of ``provider``'s lm_head step at ``shape`` (benchmarks.runner.run),
    after one unmeasured run at a tiny shape with the same hidden size."""
    from .runner import run
    from .shapes import Shape

    warm = Shape("warm-up", WARM_UP[0], WARM_UP[1], shape.hidden, shape.softcap, shape.ignore_frac)
    run(provider, warm, settings, timing=False, table="step")
    return run(provider, shape, settings, timing=timing, table="step")[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ignore-frac", type=float, default=0.5)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument(
        "--providers", default=DEFAULT_PROVIDERS, help="comma-separated provider names (python -m benchmarks --list)"
    )
    ap.add_argument(
        "--time",
        action="store_true",
        help="also report the median CPU ms of forward + backward of the providers without Triton",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as python -m benchmarks)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from .cli import choose_device

    choose_device("cpu")  # the Triton interpreter goes on before triton is imported
    import torch

    from . import providers, runner
    from .shapes import Shape

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    chosen = providers.select([n.strip() for n in args.providers.split(",") if n.strip()], "cpu")
    shape = Shape("custom", args.tokens, args.vocab, args.hidden, None, args.ignore_frac)
    settings = runner.Settings(device="cpu", dtype=dtype)
    n_valid = shape.valid
    item = torch.empty((), dtype=dtype).element_size()
    six = 6 * n_valid * args.hidden * args.vocab
    print(
        f"tokens={args.tokens} valid={n_valid} H={args.hidden} V={args.vocab} dtype={args.dtype}; "
        f"a [tokens, V] tensor would be {args.tokens * args.vocab * item / 2**20:.1f} MiB; "
        f"6*valid*H*V = {six:,}"
    )
    print(
        f"{'provider':24s} {'peak MiB':>10s} {'largest MiB':>12s} {'matmul GFLOP':>13s} "
        f"{'flops/(6 valid H V)':>20s}" + (f" {'fwd+bwd ms':>11s}" if args.time else "")
    )
    rows = []
    for p in chosen:
        r = measure(p, shape, settings, timing=args.time)
        rows.append(r)
        if r["status"] != "ok":
            print(f"{p.name:24s} {r['status']}: {r['note']}", flush=True)
            continue
        flops = r["matmul_flops"]
        counted = f"{flops / 1e9:13.3f} {flops / six:20.4f}" if flops is not None else f"{'-':>13s} {'-':>20s}"
        ms = r["time_ms_p50"]
        timed = (f" {ms:11.1f}" if ms is not None else f" {'-':>11s}") if args.time else ""
        print(
            f"{p.name:24s} {r['peak_bytes'] / 2**20:10.2f} {r['largest_alloc_bytes'] / 2**20:12.2f} {counted}{timed}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "n_valid": n_valid, "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
