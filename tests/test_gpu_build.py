"""The kernels build for real GPUs (sm_80, sm_90) without spills, and index with 64-bit offsets.

The build runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from gem_kernels import gpu_build


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_build") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gem_kernels.gpu_build", "--json", str(out)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"GPU build check failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def test_every_kernel_and_config_is_built(builds):
    built = {(b["kernel"], b["arch"], b["dtype"]) for b in builds}
    expected = {(k, a, d) for k in ("gem_fwd", "gem_bwd") for a in gpu_build.ARCHS for d in gpu_build.DTYPES}
    assert built == expected
    assert len(builds) == 2 * len(expected)  # all-features-off and all-features-on of each


def test_no_local_memory_spills(builds):
    spilled = [(b["kernel"], b["arch"], b["dtype"], b["flags"]) for b in builds
               if b["local_bytes"] or b["stack_bytes"]]
    assert not spilled, f"kernels spill to local memory: {spilled}"
    assert all(0 < b["registers"] <= 255 for b in builds)


@pytest.mark.parametrize("kernel,pointer", [("gem_fwd", "logits_ptr"), ("gem_bwd", "logits_ptr"),
                                            ("gem_bwd", "grad_ptr")])
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
