"""Ahead-of-time build check of every shipped Triton kernel for real NVIDIA GPUs, no GPU needed.

The Triton interpreter accepts programs the real compiler rejects, and hides register spills. This
compiles each kernel, with every launch configuration from ops/config.py (each candidate of the
autotuned row kernels, for the element size it serves), for sm_80 and sm_90 and
reads the cubin's resource usage with the cuobjdump shipped in the triton wheel:

    python -m gem_kernels.gpu_build          # every launch configuration, all features off / on
    python -m gem_kernels.gpu_build --all    # every launch configuration x every constexpr combination

Exits non-zero if any build fails or spills to local memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Tuple

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16", "fp16")
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class BuildResult:
    kernel: str
    arch: int
    dtype: str
    flags: Dict[str, bool]
    config: Dict[str, int]
    registers: int
    local_bytes: int
    stack_bytes: int
    ttir: str

    @property
    def ok(self) -> bool:
        return self.local_bytes == 0 and self.stack_bytes == 0


def _kernels():
    """name -> (jit function, launch configurations from ops/config.py): ``ops.KERNELS``. An
    autotuned kernel is built with every candidate configuration, each for the element size it is
    meant for."""
    from .ops import KERNELS

    return KERNELS


def _config_constexprs(cfg, flags=None) -> Dict[str, int]:
    from .ops.config import row_block

    metrics = bool(flags and flags.get("METRICS"))
    out = {"BLOCK_V": row_block(cfg, metrics) if cfg.lanes else cfg.block_v}
    if cfg.lanes:
        out["LANES"] = cfg.lanes
    return out


def _configs_for(configs, dtype: str):
    return [c for c in configs if not c.element_size or c.element_size == ELEMENT_SIZE[dtype]]


# Scalar arguments are given the narrowest type Triton may specialise them to (i32), so the build
# also proves that offsets are widened to 64 bits inside the kernels, not by the caller.
_FLOAT_SCALARS = {"inv_beta", "logit_scale", "softcap", "z_loss_scale"}
_INT64_POINTERS = {"labels_ptr"}
_FP32_POINTERS = {
    "label_logit_ptr",
    "partials_ptr",
    "stats_ptr",
    "grad_loss_ptr",
    "row_scale_ptr",
    "token_scale_ptr",
    "factor_ptr",
}


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


def _meaningful(flags: Dict[str, bool]) -> bool:
    """Flag combinations the launchers can produce: SCALE is folded into SOFTCAP (the launchers pass
    SCALE only without a softcap), and Z_LOSS and METRICS need NEED_LSE."""
    if flags.get("SCALE") and flags.get("SOFTCAP"):
        return False
    if (flags.get("Z_LOSS") or flags.get("METRICS")) and "NEED_LSE" in flags and not flags["NEED_LSE"]:
        return False
    return True


def variants(exhaustive: bool):
    """(kernel, dtype, constexpr flags, launch configuration) to build, for every launch configuration
    of every kernel and every dtype it serves: every flag combination the launchers can produce
    (exhaustive), or all features off and all on (SCALE off, since SOFTCAP replaces it)."""
    for name, (fn, configs) in _kernels().items():
        flags = [p.name for p in fn.params if p.is_constexpr and p.name not in ("BLOCK_V", "LANES")]
        for dtype in DTYPES:
            for cfg in _configs_for(configs, dtype):
                if exhaustive:
                    combos = [dict(zip(flags, c)) for c in itertools.product((False, True), repeat=len(flags))]
                else:
                    combos = [dict.fromkeys(flags, False), {f: f != "SCALE" for f in flags}]
                    combos = combos[:1] if not flags else combos
                for combo in combos:
                    if _meaningful(combo):
                        yield name, dtype, combo, cfg


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def build(kernel: str, arch: int, dtype: str, flags: Dict[str, bool], cfg) -> BuildResult:
    """Compile ``kernel`` with constexpr ``flags`` and the ops/config.py LaunchConfig ``cfg``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[kernel][0]
    launch = _config_constexprs(cfg, flags)
    constexprs = dict(flags, **launch)
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"could not read resource usage of {kernel}: {out}")
    config = dict(launch, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return BuildResult(
        kernel, arch, dtype, flags, config, int(m.group(1)), int(m.group(3)), int(m.group(2)), compiled.asm["ttir"]
    )


def _build_job(job):
    """Process-pool entry: (kernel, arch, dtype, flags, LaunchConfig) -> BuildResult or an error string."""
    kernel, arch, dtype, flags, launch = job
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        return build(kernel, arch, dtype, flags, launch)
    except Exception as e:  # a build failure is a finding: report it and go on
        return f"{type(e).__name__}: {e}"


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every constexpr combination")
    parser.add_argument("--json", metavar="PATH", help="also write every result (with its TTIR) as JSON")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="builds run in this many processes (default: min(8, CPUs))",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Interpreted kernels cannot be compiled: rerun this check in a clean process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "gem_kernels.gpu_build", *(argv or sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = [
        (kernel, arch, dtype, flags, launch) for kernel, dtype, flags, launch in variants(args.all) for arch in ARCHS
    ]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            outcomes = pool.map(_build_job, jobs, chunksize=1)
    else:
        outcomes = [_build_job(j) for j in jobs]
    results = []
    failures = 0
    worst: Dict[Tuple[str, int, str], int] = {}
    for (kernel, arch, dtype, flags, launch), r in zip(jobs, outcomes):
        if isinstance(r, str):
            failures += 1
            print(f"FAIL build {kernel} sm_{arch} {dtype} {launch} {flags}: {r}")
            continue
        results.append(r)
        key = (kernel, arch, " ".join(f"{k}={v}" for k, v in r.config.items()))
        worst[key] = max(worst.get(key, 0), r.registers)
        if not r.ok:
            failures += 1
            print(
                f"FAIL spill {kernel} sm_{arch} {dtype} {launch} {flags}: local={r.local_bytes} stack={r.stack_bytes}"
            )
    for (kernel, arch, cfg), regs in sorted(worst.items()):
        print(f"{kernel:12s} sm_{arch} {cfg}: max {regs} registers/thread")
    print(f"{len(results)} builds, {failures} failures (spills are failures)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
