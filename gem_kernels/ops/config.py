"""Launch configurations of every Triton kernel, in one place.

How they were chosen (no GPU is available to this project, so by reasoning plus the GPU-build
check in tests/test_gpu_build.py, which compiles each one for sm_80 and sm_90 and asserts zero
local-memory spills):
- The forward kernel streams one row per program. BLOCK_V elements in flight per iteration with 8
  warps is 8 fp32 values per thread and tensor: enough bytes in flight to cover HBM latency on
  A100/H100 while the live tensors (t, e, w, e*w*(t - t_y), exp(t - m)) stay well inside the
  register file. 4096 keeps the loop count at 32 for V = 128,256.
- The backward kernel is a 2-D grid (rows x vocabulary blocks) with no loop: each program reads and
  writes one block once. 4096 elements with 8 warps again gives 16-byte vector accesses and
  enough programs (V / 4096 per row) to fill the machine at a few hundred rows.
- The row axis is grid axis 0 (limit 2^31 - 1); vocabulary blocks go on axis 1, whose 65,535
  limit allows V up to 2.68e8 at BLOCK_V = 4096.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    num_warps: int
    num_stages: int = 1


FORWARD = LaunchConfig(block_v=4096, num_warps=8)
BACKWARD = LaunchConfig(block_v=4096, num_warps=8)

# Grid axis 1 limit on CUDA.
MAX_GRID_Y = 65535
