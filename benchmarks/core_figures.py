"""Measured figures of the core gem_loss kernels: global-memory traffic and [N, V] allocations.

    python -m benchmarks.core_figures                 # N=512, V=32,000, bf16 (a few seconds)
    python -m benchmarks.core_figures --tokens 64 --vocab 128256

Traffic is counted under the Triton interpreter (bytes the kernels' loads and stores touch, masked
lanes excluded) over forward + backward, and reported as passes over the logits
(bytes / (N * V * element size)); the budget is 3.05. Memory is tracked allocation by allocation
(torch.profiler); the figure is how many single allocations of >= N * V elements happen during
forward + backward: 1 (the gradient) by default, 0 with inplace_backward=True. (The torch path's
per-block fp32 temporaries cover at most 1/8 of the input's bytes, or 2^16 elements when that is
more, so this holds for it once N >= 8 and N * V >= 2^19.) The logits come from the main harness's
input factory (benchmarks.runner.make_logits); no figure depends on their values.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import List  # noqa: E402

import torch  # noqa: E402

from gem_kernels import gem_loss  # noqa: E402

from .measure import peak_memory  # noqa: E402
from .runner import LOGITS_HIDDEN, Settings, make_logits  # noqa: E402
from .shapes import Shape  # noqa: E402
from .traffic import count_traffic  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAFFIC_BUDGET = 3.05

CASES = {
    "linear": {},
    "logsigmoid": {"h": "logsigmoid"},
    "everything": {"h": "logsigmoid", "softcap": 30.0, "z_loss_scale": 1e-4, "return_ce": True},
}


@dataclass
class Figure:
    impl: str
    case: str
    inplace: bool
    passes: float  # traffic / (N V elsize); NaN when not a Triton path
    nv_allocs: int  # allocations of >= N*V elements during fwd+bwd
    peak_bytes: int


def _fwd_bwd(logits, labels, impl, inplace, options):
    out = gem_loss(logits, labels, impl=impl, inplace_backward=inplace, **options)
    (out[0] if isinstance(out, tuple) else out).backward()


def measure(n: int, v: int, dtype: torch.dtype, impls=("triton", "torch")) -> List[Figure]:
    figures = []
    nv_bytes = n * v * torch.empty((), dtype=dtype).element_size()
    logits, labels = make_logits(Shape("custom", n, v, LOGITS_HIDDEN), Settings(device="cpu", dtype=dtype))
    logits = logits.detach()
    for impl in impls:
        for case, options in CASES.items():
            for inplace in (False, True):
                passes = float("nan")
                if impl == "triton":
                    x = logits.clone().requires_grad_()
                    t = count_traffic(_fwd_bwd, x, labels, impl, inplace, options)
                    passes = t.total_bytes / nv_bytes
                x = logits.clone().requires_grad_()
                mem = peak_memory(_fwd_bwd, x, labels, impl, inplace, options)
                figures.append(Figure(impl, case, inplace, passes, mem.count_allocs_at_least(nv_bytes), mem.peak_bytes))
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    nv_bytes = a.tokens * a.vocab * torch.empty((), dtype=dtype).element_size()
    print(
        f"N={a.tokens} V={a.vocab} {a.dtype}: one [N, V] tensor = {nv_bytes / 2**20:.1f} MiB; "
        f"traffic budget {TRAFFIC_BUDGET} passes"
    )
    print(
        "| impl | case | inplace_backward | traffic (passes over logits) | allocations >= N*V "
        "| peak extra (x N*V bytes) |"
    )
    print("|---|---|---|---|---|---|")
    ok = True
    for f in measure(a.tokens, a.vocab, dtype):
        traffic = "n/a (no kernel)" if f.passes != f.passes else f"{f.passes:.3f}"
        print(f"| {f.impl} | {f.case} | {f.inplace} | {traffic} | {f.nv_allocs} | {f.peak_bytes / nv_bytes:.3f} |")
        ok &= (f.passes != f.passes or f.passes <= TRAFFIC_BUDGET) and f.nv_allocs == (0 if f.inplace else 1)
    print("all figures within budget" if ok else "SOME FIGURE IS OUT OF BUDGET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
