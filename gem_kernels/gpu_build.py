"""Ahead-of-time build check of every shipped Triton kernel for real NVIDIA GPUs, no GPU needed.

The Triton interpreter accepts programs the real compiler rejects, and hides register spills. This
compiles each kernel, with its launch configuration from ops/config.py, for sm_80 and sm_90 and
reads the cubin's resource usage with the cuobjdump shipped in the triton wheel:

    python -m gem_kernels.gpu_build          # representative variants (all features off / on)
    python -m gem_kernels.gpu_build --all    # every constexpr combination

Exits non-zero if any build fails or spills to local memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import itertools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class BuildResult:
    kernel: str
    arch: int
    dtype: str
    flags: Dict[str, bool]
    registers: int
    local_bytes: int
    stack_bytes: int
    ttir: str

    @property
    def ok(self) -> bool:
        return self.local_bytes == 0 and self.stack_bytes == 0


def _kernels():
    from .ops import config
    from .ops.gem_bwd import _gem_bwd_kernel
    from .ops.gem_fwd import _gem_fwd_kernel

    return {"gem_fwd": (_gem_fwd_kernel, config.FORWARD), "gem_bwd": (_gem_bwd_kernel, config.BACKWARD)}


# Scalar arguments are given the narrowest type Triton may specialise them to (i32), so the build
# also proves that offsets are widened to 64 bits inside the kernels, not by the caller.
_FLOAT_SCALARS = {"inv_beta", "logit_scale", "softcap", "z_loss_scale"}
_INT64_POINTERS = {"labels_ptr"}
_FP32_POINTERS = {"label_logit_ptr", "partials_ptr", "stats_ptr", "grad_loss_ptr"}


def _signature(fn, dtype: str, constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in _INT64_POINTERS else "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr(s) {missing}")
    return sig


def variants(exhaustive: bool) -> Iterator[Tuple[str, str, Dict[str, bool]]]:
    """(kernel, dtype, constexpr flags) to build: every combination, or all-off and all-on."""
    for name, (fn, _) in _kernels().items():
        flags = [p.name for p in fn.params if p.is_constexpr and p.name != "BLOCK_V"]
        if exhaustive:
            combos = list(itertools.product((False, True), repeat=len(flags)))
        else:
            combos = [(False,) * len(flags), (True,) * len(flags)]
        for dtype in DTYPES:
            for combo in combos:
                yield name, dtype, dict(zip(flags, combo))


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def build(kernel: str, arch: int, dtype: str, flags: Dict[str, bool]) -> BuildResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, cfg = _kernels()[kernel]
    constexprs = dict(flags, BLOCK_V=cfg.block_v)
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"could not read resource usage of {kernel}: {out}")
    return BuildResult(kernel, arch, dtype, flags, int(m.group(1)), int(m.group(3)), int(m.group(2)),
                       compiled.asm["ttir"])


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every constexpr combination")
    parser.add_argument("--json", metavar="PATH", help="also write every result (with its TTIR) as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Interpreted kernels cannot be compiled: rerun this check in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "gem_kernels.gpu_build", *(argv or sys.argv[1:])], env=env).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = []
    failures = 0
    worst: Dict[Tuple[str, int], int] = {}
    count = 0
    for kernel, dtype, flags in variants(args.all):
        for arch in ARCHS:
            try:
                r = build(kernel, arch, dtype, flags)
            except Exception as e:  # a build failure is a finding, report it and go on
                failures += 1
                print(f"FAIL build {kernel} sm_{arch} {dtype} {flags}: {e}")
                continue
            count += 1
            results.append(r)
            worst[(kernel, arch)] = max(worst.get((kernel, arch), 0), r.registers)
            if not r.ok:
                failures += 1
                print(f"FAIL spill {kernel} sm_{arch} {dtype} {flags}: local={r.local_bytes} stack={r.stack_bytes}")
    for (kernel, arch), regs in sorted(worst.items()):
        print(f"{kernel:8s} sm_{arch}: max {regs} registers/thread, 0 bytes local memory")
    print(f"{count} builds, {failures} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
