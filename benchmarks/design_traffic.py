"""Global-memory traffic of the two Triton designs of gem_loss, split into forward / backward and
first reads / re-reads, counted under the Triton interpreter (no GPU needed, nothing timed):

    python -m benchmarks.design_traffic                      # N=64, V=32,000, bf16 (a few minutes)
    python -m benchmarks.design_traffic --tokens 16 --vocab 128256

Figures are passes over the logits (bytes / (N * V * element size)). "re-read" is what a program
loads again after loading it itself (the gradient-in-forward kernel's second read of its row): on a
GPU it is served from L2 while the rows in flight fit there, which only a GPU run can confirm, so
the last column (requested bytes less re-reads) is the DRAM traffic in that case. See docs/kernels.md.
The logits come from the main harness's input factory (benchmarks.runner.make_logits).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402

import torch  # noqa: E402

from gem_kernels import gem_loss  # noqa: E402

from .runner import LOGITS_HIDDEN, Settings, make_logits  # noqa: E402
from .shapes import Shape  # noqa: E402
from .traffic import count_traffic  # noqa: E402

EVERYTHING = {"h": "logsigmoid", "softcap": 30.0, "z_loss_scale": 1e-4, "return_ce": True}
CASES = (
    # (label, gem_loss options, upstream factor of the reduced loss, backward?)
    ("mean, `loss.backward()` (gradient in forward)", {}, 1.0, True),
    ("mean, `(2 * loss).backward()` (gradient in forward, then rescaled)", {}, 2.0, True),
    ("mean, `inplace_backward=True` (gradient in forward)", {"inplace_backward": True}, 1.0, True),
    ("mean, logsigmoid + softcap + z-loss + `return_ce` (gradient in forward)", EVERYTHING, 1.0, True),
    ("`reduction='none'`, `.sum().backward()` (split design)", {"reduction": "none"}, 1.0, True),
    ("mean, under `torch.no_grad()` (statistics only)", {}, 1.0, False),
)


def measure(n: int, v: int, dtype: torch.dtype):
    logits, labels = make_logits(Shape("custom", n, v, LOGITS_HIDDEN), Settings(device="cpu", dtype=dtype))
    logits = logits.detach()
    nv = logits.numel() * logits.element_size()
    rows = []
    for label, options, upstream, backward in CASES:
        x = logits.clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            fwd = count_traffic(gem_loss, x, labels, impl="triton", **options)
        loss = fwd.result[0] if isinstance(fwd.result, tuple) else fwd.result
        bwd = count_traffic((loss.sum() * upstream).backward) if backward else None
        f = [fwd.loaded_bytes / nv, fwd.reread_bytes / nv, fwd.stored_bytes / nv]
        b = [bwd.loaded_bytes / nv, bwd.reread_bytes / nv, bwd.stored_bytes / nv] if bwd else [0.0, 0.0, 0.0]
        total = f[0] + f[2] + b[0] + b[2]
        rows.append((label, f, b, total, total - f[1] - b[1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"N={a.tokens} V={a.vocab} {a.dtype}; passes over the logits")
    print(
        "| call | forward read (of which re-read) | forward write | backward read | backward write "
        "| requested | requested less re-reads |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, f, b, total, dram in measure(a.tokens, a.vocab, dtype):
        print(
            f"| {label} | {f[0]:.3f} ({f[1]:.3f}) | {f[2]:.3f} | {b[0]:.3f} | {b[2]:.3f} | {total:.3f} | {dram:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
