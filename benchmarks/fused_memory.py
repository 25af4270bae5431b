"""Peak memory and matmul FLOPs of fused lm_head + loss, forward and backward, on CPU.

Compares gem_kernels.fused_linear_gem_loss (impl "torch" and "triton", the latter through the
Triton interpreter) with Liger-Kernel's fused linear cross-entropy (its Triton CE kernel, also
interpreted) and with the naive ``gem_loss_reference(hidden @ W.T)``, at the same shapes and
measured the same way (benchmarks.measure.peak_memory: profiler allocation events, peak above
the state before the call; the call is forward + backward, so the returned .grad tensors count).

    TRITON_INTERPRET=1 python -m benchmarks.fused_memory --tokens 4096 --hidden 256 --vocab 32000

Interpreter timings are not kernel speed and are not reported.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from benchmarks.measure import count_flops, peak_memory  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_problem(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, ignore_frac: float, bias: bool,
                 seed: int = 0):
    """hidden [tokens, H], weight [V, H], optional bias [V] (all requiring grad) and labels [tokens]
    with exactly round(ignore_frac * tokens) of them (every other one at 0.5) set to -100."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    n_ignored = round(ignore_frac * tokens)
    if n_ignored:
        drop = torch.randperm(tokens, generator=g)[:n_ignored]
        labels[drop] = -100
    return x, w, b, labels


def _gem(impl, chunk_size=None, low_memory=False):
    from gem_kernels import fused_linear_gem_loss

    def loss_fn(x, w, b, labels):
        return fused_linear_gem_loss(x, w, labels, b, impl=impl, chunk_size=chunk_size, low_memory=low_memory)

    return loss_fn


def _liger(accum_dtype=None):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def loss_fn(x, w, b, labels):
        return liger_fused_linear_cross_entropy(x, w, labels, bias=b, accum_dtype=accum_dtype)

    return loss_fn


def _naive(x, w, b, labels):
    from gem_kernels.reference import gem_loss_reference

    return gem_loss_reference(torch.nn.functional.linear(x, w, b), labels)


def _torch_ce(x, w, b, labels):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, b).float(), labels)


# Methods that run no Triton kernel: their CPU wall time means something (--time).
TIMEABLE = ("gem_torch", "gem_torch_lowmem", "naive_gem", "torch_ce")

METHODS = {
    "gem_torch": lambda: _gem("torch"),
    "gem_triton": lambda: _gem("triton"),
    "gem_torch_lowmem": lambda: _gem("torch", low_memory=True),
    "gem_triton_lowmem": lambda: _gem("triton", low_memory=True),
    "liger_ce": lambda: _liger(),
    "liger_ce_fp32_accum": lambda: _liger(torch.float32),
    "naive_gem": lambda: _naive,
    "torch_ce": lambda: _torch_ce,
}


def wall_time(method: str, x, w, b, labels, repeats: int) -> float:
    """Best-of-``repeats`` seconds of forward + backward (after one warm-up call)."""
    import time

    loss_fn = METHODS[method]()
    best = float("inf")
    for i in range(repeats + 1):
        for p in (x, w, b):
            if p is not None:
                p.grad = None
        t0 = time.perf_counter()
        loss_fn(x, w, b, labels).backward()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def measure(method: str, x, w, b, labels, flops: bool = True) -> dict:
    """Peak extra bytes and largest allocation of forward + backward, and matmul FLOPs (-1 if not
    counted: a second interpreted run of a big shape takes long)."""
    loss_fn = METHODS[method]()
    params = [t for t in (x, w, b) if t is not None]

    def step():
        loss = loss_fn(x, w, b, labels)
        loss.backward()
        return loss.detach()

    # Warm-up at a tiny shape: a first interpreted call leaves a buffer alive that a later call
    # frees; that must not happen inside a measured window.
    wx, ww, wb, wl = make_problem(64, x.shape[1], 500, x.dtype, 0.5, b is not None, seed=1)
    loss_fn(wx, ww, wb, wl).backward()
    del wx, ww, wb, wl
    for p in params:
        p.grad = None
    rep = peak_memory(step)
    grads = {name: p.grad.detach().clone() for name, p in zip("xwb", params)}
    for p in params:
        p.grad = None
    flops = count_flops(step) if flops else -1
    for p in params:
        p.grad = None
    return dict(method=method, peak_bytes=rep.peak_bytes, largest_alloc_bytes=rep.largest_alloc_bytes,
                num_allocs=rep.num_allocs, flops=flops, loss=float(rep.result), grads=grads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ignore-frac", type=float, default=0.5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--methods", default="gem_torch,gem_triton,liger_ce,naive_gem")
    ap.add_argument("--no-flops", default="", help="comma-separated methods whose FLOPs are not counted")
    ap.add_argument("--time", type=int, default=0, metavar="N",
                    help=f"also report best-of-N CPU seconds of forward + backward for {TIMEABLE}")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    x, w, b, labels = make_problem(args.tokens, args.hidden, args.vocab, dtype, args.ignore_frac, args.bias)
    n_valid = int((labels != -100).sum())
    item = torch.empty((), dtype=dtype).element_size()
    tokens_x_v = args.tokens * args.vocab * item
    print(f"tokens={args.tokens} valid={n_valid} H={args.hidden} V={args.vocab} dtype={args.dtype} "
          f"bias={args.bias}; a [tokens, V] tensor would be {tokens_x_v / 2**20:.1f} MiB; "
          f"6*valid*H*V = {6 * n_valid * args.hidden * args.vocab:,}")
    print(f"{'method':22s} {'peak MiB':>10s} {'largest MiB':>12s} {'allocs':>7s} {'matmul GFLOP':>13s} "
          f"{'flops/(6 valid H V)':>20s}")
    rows = []
    for m in args.methods.split(","):
        r = measure(m, x, w, b, labels, flops=m not in args.no_flops.split(","))
        rows.append(r)
        print(f"{m:22s} {r['peak_bytes'] / 2**20:10.2f} {r['largest_alloc_bytes'] / 2**20:12.2f} "
              f"{r['num_allocs']:7d} {r['flops'] / 1e9:13.3f} "
              f"{r['flops'] / (6 * n_valid * args.hidden * args.vocab):20.4f}", flush=True)
    if args.time:
        print(f"CPU wall time, forward + backward, best of {args.time} ({torch.get_num_threads()} threads):")
        for m in args.methods.split(","):
            if m in TIMEABLE:
                secs = wall_time(m, x, w, b, labels, args.time)
                print(f"{m:22s} {secs * 1e3:10.1f} ms", flush=True)
                next(r for r in rows if r["method"] == m)["seconds"] = secs
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "n_valid": n_valid,
                       "results": [{k: v for k, v in r.items() if k != "grads"} for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
