"""Launch configurations of every Triton kernel, in one place, with how they were chosen.

No GPU was available when these were chosen: they come from reasoning about the hardware (below)
and from the ahead-of-time build check (``python -m gem_kernels.gpu_build --all``), which compiles
every configuration of every kernel for sm_80 and sm_90 and asserts zero local-memory spills. The
GPU benchmark (``python -m benchmarks``) is where they are to be timed.

Hardware facts used (per SM): A100 and H100/H200 both have 64 K 32-bit registers, at most 2,048
threads, 40 MB (A100) / 50 MB (H100, H200) of L2 for 108 / 132 SMs, and need roughly 10 KB (A100,
~2 TB/s) / 25-30 KB (H200, ~4.3 TB/s measured) of loads in flight per SM to cover DRAM latency
(Little's law: bandwidth x ~0.7 us / SMs).

Row kernels (``gem_fwd``: statistics only; ``gem_fwd_grad``: statistics then the gradient of the
same row). One program streams one row in steps of BLOCK_V elements, loaded as a
[BLOCK_V // LANES, LANES] tile and folded into LANES per-lane online accumulators
(``_common.row_partials``). LANES = vector width (16 bytes: 8 bf16/fp16 or 4 fp32 elements) x 32
threads x num_warps, so each thread owns whole columns of the tile: the fold over the tile's rows
stays in registers and a step needs no cross-thread reduction and no barrier (the former kernel did
three block reductions per 4,096-element step and was latency-bound at half the bandwidth). Each
thread has BLOCK_V / LANES 16-byte loads in flight per step: 4 with 8 warps (16 KB per program),
2 with 16 warps (16 KB per program; 4 would need more than the 128 registers 16 warps allow, the
build check showed spills). Programs per SM follow from the registers a variant compiles to
(``python -m gem_kernels.gpu_build`` prints them): given the budget below, ptxas uses up to 128
(16 warps) or 235-255 (8 warps) registers per thread, i.e. one program and 16 KB of loads in flight
per SM: enough for an A100, below the 25-30 KB an H200 needs by the estimate above, so the first
thing to measure there. Rows per program: one. Rows are long (64-512 KB at V = 32 K-128 K), so
per-program launch cost is negligible, and a program that owned several rows would only hold more
of them in flight, which the gradient kernel must avoid (next point).

``gem_fwd_grad`` re-reads its row in the second loop and wants that read served from L2: the rows
in flight at once (programs per SM x SMs x row bytes) should fit in L2. At V = 128,256 in bf16 a row
is 256 KB; H200 has 50 MB / 132 SMs = 380 KB per SM, so one program per SM (34 MB in flight) fits
and two (67 MB) do not entirely. Its first candidate is therefore the 16-warp one (one 512-thread
program per SM at its register budget). The second loop walks the row
backwards, so what it reads first is what the first loop read last (the most recently used lines,
the last to be evicted); the first loop's loads are marked ``evict_last`` (keep for the re-read),
the second loop's ``evict_first`` (not needed again). The 8-warp candidate holds the same bytes in flight with fewer,
longer tiles; which one wins is for the autotuner (and a GPU profile) to say. The second
loop moves two 16-byte vectors per thread per step (no accumulators to keep).

Registers: every row configuration gives ptxas the register budget of one program per SM
(``maxnreg``: 128 per thread for 16 warps, 255 for 8). Without it ptxas trades a few bytes of spills
for occupancy in some variants; a budget of 128 for 8 warps spilled too (build check); approximate division
in the sigmoids (``_common.fast_sigmoid``, at most 2 ulp) keeps the IEEE division subroutine and
its register cost out of the unrolled tiles.

Autotuning: one configuration cannot serve every (V, dtype): the element size sets the vector
width (so LANES), and the row size decides whether one or two programs per SM fit the L2. The row
kernels are therefore wrapped in ``triton.autotune`` keyed on V, h and METRICS (the autotuner adds the dtypes
of the tensor arguments to the key) over the candidates below, filtered to the logits' element size
and to blocks no larger than the row (``_common.row_autotune``). Under the Triton interpreter the
first candidate runs (there is nothing to time). Autotuning ``gem_fwd_grad`` with
``inplace_backward=True`` restores the logits between trials (``restore_value``), i.e. copies them
on the first call per (V, dtype, h).

num_stages stays 1: the loops are plain loads feeding register math, which Triton's software
pipeliner does not turn into asynchronous copies (checked: the TTGIR of num_stages=3 builds of
these kernels has no async copy and the same registers), so the loads in flight come from the tile
height and the programs per SM instead.

2-D backward (``gem_bwd``, used where the split design is kept): a grid of (rows, vocabulary blocks)
with no loop; each program reads and writes one block once. 4,096 elements with 8 warps gives
16-byte vector accesses and V / 4096 programs per row to fill the machine at a few hundred rows.
The row axis is grid axis 0 (limit 2^31 - 1); vocabulary blocks go on axis 1, whose 65,535 limit
allows V up to 2.68e8 at BLOCK_V = 4096.

Upstream scaling (``gem_scale``): one program per row, which reads the row's upstream factor and
the token weight and returns at once when they are equal (a mean loss backpropagated as is), else
rescales the row in 4,096-element steps with 8 warps (16-byte accesses, a pure stream).

Whole-gradient scaling (``grad_scale``, the fused path's d hidden / d weight / d bias): one program
per 8,192 elements with 8 warps, i.e. two 16-byte bf16 vectors (or four fp32 ones) per thread, no
loop: a pure stream whose common case (factor exactly 1) is one scalar load per program. 8,192
keeps the grid at 64 K programs for a Llama-3 8B weight gradient (5.3e8 elements), so the skipped
case costs tens of microseconds, not a pass over the 1 GB gradient.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    num_warps: int
    num_stages: int = 1
    lanes: int = 0  # row kernels: accumulator lanes (see above); 0 for the others
    element_size: int = 0  # row kernels: the logits element size this configuration is for
    maxnreg: int = 0  # register budget per thread given to ptxas (0: its default, see above)


def _row(element_size: int, num_warps: int, loads_per_thread: int) -> LaunchConfig:
    """A row-kernel configuration: LANES = one 16-byte vector per thread, BLOCK_V = loads_per_thread
    of them per step."""
    lanes = (16 // element_size) * 32 * num_warps
    return LaunchConfig(
        block_v=lanes * loads_per_thread,
        num_warps=num_warps,
        lanes=lanes,
        element_size=element_size,
        maxnreg=_row_maxnreg(num_warps),
    )


# Register budget of the row kernels (ptxas .maxnreg): what one program may use, 64 K registers /
# (32 x warps), at most 255: 128 for 16 warps, 255 for 8. Without it ptxas aims at higher occupancy
# by itself and spills a few bytes in some variants (found by the build check).
def _row_maxnreg(num_warps: int) -> int:
    return min(255, 65536 // (32 * num_warps))


# Candidates, first choice first (the one the interpreter runs), as (element size, warps, 16-byte
# loads per thread per step): bf16/fp16 8 warps x 4 -> BLOCK_V 8,192 / LANES 2,048; 16 warps x 2 ->
# 8,192 / 4,096; fp32 8 warps x 4 -> 4,096 / 1,024; 16 warps x 4 -> 8,192 / 2,048.
FORWARD_CONFIGS = (_row(2, 8, 4), _row(2, 16, 2), _row(4, 8, 4), _row(4, 16, 4))
FORWARD_GRAD_CONFIGS = (_row(2, 16, 2), _row(2, 8, 4), _row(4, 16, 4), _row(4, 8, 4))


def row_block(cfg: LaunchConfig, metrics: bool) -> int:
    """BLOCK_V of a row configuration for a launch: half the tile height with METRICS
    (return_metrics keeps two more accumulators per lane plus an arg-max, and the full tile spilled in
    its heaviest variants in the build check)."""
    return max(cfg.lanes, cfg.block_v // 2) if metrics else cfg.block_v


BACKWARD = LaunchConfig(block_v=4096, num_warps=8)
SCALE = LaunchConfig(block_v=4096, num_warps=8)
GRAD_SCALE = LaunchConfig(block_v=8192, num_warps=8)

# Grid axis 1 limit on CUDA.
MAX_GRID_Y = 65535
