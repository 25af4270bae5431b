"""The kernels build for real GPUs (sm_80, sm_90) without spills, with every launch configuration
of ops/config.py (every autotune candidate), and index with 64-bit offsets.

The build runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from gem_kernels import gpu_build
from gem_kernels.ops import config


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_build") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "gem_kernels.gpu_build", "--jobs", "2", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"GPU build check failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def _key(cfg):
    return cfg.block_v, cfg.lanes, cfg.num_warps, cfg.num_stages


def test_every_kernel_and_config_is_built(builds):
    """Every (kernel, launch configuration, dtype it serves, arch), all features off and on (the
    all-off variant has the configuration's own BLOCK_V)."""
    configs = {
        "gem_fwd": config.FORWARD_CONFIGS,
        "gem_fwd_grad": config.FORWARD_GRAD_CONFIGS,
        "gem_bwd": (config.BACKWARD,),
        "gem_scale": (config.SCALE,),
        "grad_scale": (config.GRAD_SCALE,),
    }
    expected = set()
    for kernel, cfgs in configs.items():
        for cfg in cfgs:
            for dtype in gpu_build.DTYPES:
                if cfg.element_size in (0, gpu_build.ELEMENT_SIZE[dtype]):
                    expected |= {(kernel, _key(cfg), arch, dtype) for arch in gpu_build.ARCHS}
    built = {
        (
            b["kernel"],
            (b["config"]["BLOCK_V"], b["config"].get("LANES", 0), b["config"]["num_warps"], b["config"]["num_stages"]),
            b["arch"],
            b["dtype"],
        )
        for b in builds
    }
    assert built >= expected  # with METRICS the row kernels halve BLOCK_V (ops/config.py row_block)
    assert {k[0] for k in built} == set(configs)
    for kernel in ("gem_fwd", "gem_fwd_grad", "gem_bwd"):
        variants = [b for b in builds if b["kernel"] == kernel]
        assert any(all(v for k, v in b["flags"].items() if k != "SCALE") for b in variants), kernel
        assert any(not any(b["flags"].values()) for b in variants), kernel


def test_no_local_memory_spills(builds):
    spilled = [
        (b["kernel"], b["config"], b["arch"], b["dtype"], b["flags"])
        for b in builds
        if b["local_bytes"] or b["stack_bytes"]
    ]
    assert not spilled, f"kernels spill to local memory: {spilled}"
    assert all(0 < b["registers"] <= 255 for b in builds)


@pytest.mark.parametrize(
    "kernel,pointer",
    [
        ("gem_fwd", "logits_ptr"),
        ("gem_fwd_grad", "logits_ptr"),
        ("gem_fwd_grad", "grad_ptr"),
        ("gem_bwd", "logits_ptr"),
        ("gem_bwd", "grad_ptr"),
        ("gem_scale", "grad_ptr"),
    ],
)
def test_row_offsets_are_64_bit(builds, kernel, pointer):
    """N * V >= 2^31 must not overflow: the row offset added to each [N, V] base pointer is i64
    even though the row stride argument was compiled as i32 (Triton's narrowest specialisation)."""
    for b in builds:
        if b["kernel"] != kernel:
            continue
        adds = re.findall(rf"tt\.addptr %{pointer}, %\S+ : !tt\.ptr<\w+>, (\w+)", b["ttir"])
        assert adds, f"no scalar offset added to {pointer} in {kernel}'s TTIR ({b['dtype']}, {b['flags']})"
        assert set(adds) == {"i64"}, f"{kernel}: {pointer} offset types {adds}"
        assert re.search(r"arith\.extsi %stride_\w+ : i32 to i64", b["ttir"])


def test_flat_offsets_are_64_bit(builds):
    """grad_scale indexes a whole [V, H] gradient (over 2^31 elements for large heads): the program
    id is widened to i64 before it is multiplied by the block size."""
    flat = [b for b in builds if b["kernel"] == "grad_scale"]
    assert flat
    for b in flat:
        assert re.search(r"%(\w+) = tt\.get_program_id x : i32.*?arith\.extsi %\1 : i32 to i64", b["ttir"], re.S)
        assert re.search(r"tt\.addptr %\w+, %\w+ : tensor<\d+x!tt\.ptr<\w+>>, tensor<\d+xi64>", b["ttir"])
