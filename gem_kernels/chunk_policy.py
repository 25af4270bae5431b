"""How many rows the chunked passes process at once: the one owner of those choices.

A leaf module (it imports nothing from the package) so that ``torch_ops`` (row blocks of the
PyTorch GEM path), ``autograd`` (the fused lm_head Function) and ``functional`` (the
vocabulary-parallel fused path, whose ranks must agree on the chunking) all ask the same functions.
Every choice is a pure function of shapes, the element size and the device kind ("cuda" or
"cpu"), so tests pin them without a GPU.

- :func:`fused_chunk_rows`: valid tokens per chunk of ``fused_linear_gem_loss`` (``chunk_size=None``).
- :func:`vocab_pass_plan`: the vocabulary slices of its low-memory mode's second pass.
- :func:`torch_block_rows`: rows per block of the chunked PyTorch GEM path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

# --- CPU (what was measured best there; unchanged) ------------------------------------------
# A chunk's logits hold about as many elements as the valid hidden states (valid * H), rounded up
# to a multiple of 16: on a CPU the matmuls run at nearly the same speed for any chunk of a few
# dozen rows, so memory decides (benchmarks/fused_memory.py, README "Fused lm_head").
CPU_ROW_MULTIPLE = 16

# --- CUDA ----------------------------------------------------------------------------------------
# Rows are a multiple of a tensor-core tile height (cuBLAS / Triton tiles of 128 rows on sm_80/90):
# a 272-row chunk pays for 384 rows of tiles.
CUDA_TILE_ROWS = 128
# Memory budget of the default mode: one chunk of logits [c, V] costs at most this fraction of the
# lm_head weight's bytes [V, H], i.e. c <= 3/8 * H whatever V (so vocabulary shards agree). With
# the fp32 d weight accumulator (2 x the weight's bytes for a bf16 weight, the returned gradient
# living inside it) the step's peak is then about 2.4 x the weight + grad_hidden: 2.39 GiB at
# Llama-3 8B (V = 128,256, H = 4,096), where a 2,048-row chunk (1/2) would give 2.51 GiB.
CUDA_LOGITS_FRACTION = 3 / 8
# Low-memory mode, first pass (no d weight exists yet): a chunk's logits up to half the weight.
CUDA_LOW_MEMORY_FRACTION = 1 / 2


@dataclass(frozen=True)
class DeviceModel:
    """Throughputs of the cost model. Defaults: an H200 run of 2026-11-30 (the sweep in
    :func:`fused_chunk_rows`' docstring): a bf16
    8192^3 matmul at 687 TFLOP/s (690-790 across runs), 4.3 TB/s measured copy bandwidth."""

    matmul_flops: float = 687e12  # FLOP/s of a large bf16 matmul
    bandwidth: float = 4.3e12  # bytes/s of HBM
    launch_s: float = 30e-6  # fixed cost per chunk (kernel launches, Python)


H200 = DeviceModel()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, m: int) -> int:
    return _ceil_div(a, m) * m


def cuda_step_seconds(
    n_valid: int,
    hidden_size: int,
    vocab_size: int,
    chunk_rows: int,
    *,
    itemsize: int = 2,
    low_memory: bool = False,
    model: DeviceModel = H200,
) -> float:
    """Modelled time of one fused lm_head + GEM step (forward + backward, d hidden and d weight) on
    a GPU, in seconds: the sum over chunks of

    - three matmuls (logits ``x @ W.T``, d hidden ``dZ @ W``, d weight ``dZ.T @ x``), each
      ``max(FLOPs / matmul rate, bytes / bandwidth)``, the FLOPs counted on rows rounded up to the
      128-row tile; the logits and d hidden matmuls read W (V x H x itemsize bytes), the d weight
      matmul then reads and writes the fp32 [V, H] accumulator (8 x V x H bytes), added to its
      compute time since a GEMM touches its output in the epilogue, after the main loop: the
      per-chunk cost that many thin chunks multiply;
    - the GEM kernels: the chunk's logits read twice and written once (3 x c x V x itemsize bytes);
    - a fixed ``launch_s``.

    ``low_memory``: the first pass has no d weight matmul; the second pass (vocabulary slices over
    all valid tokens) adds one logits and one d weight matmul at full efficiency, with no
    accumulator (8 instead of 6 x valid x H x V FLOPs).
    """
    H, V, isz, P, B = hidden_size, vocab_size, itemsize, model.matmul_flops, model.bandwidth

    def chunk(m: int) -> float:
        flops = 2.0 * _round_up(m, CUDA_TILE_ROWS) * H * V
        read_w = (V * H + m * H + m * V) * isz / B
        t = 2 * max(flops / P, read_w)
        if not low_memory:  # the accumulator is read and written in the epilogue, after the main loop
            t += flops / P + (8.0 * V * H + (m * V + m * H) * isz) / B
        return t + 3.0 * m * V * isz / B + model.launch_s

    full, rest = divmod(n_valid, chunk_rows)
    total = full * chunk(chunk_rows) + (chunk(rest) if rest else 0.0)
    if low_memory:
        total += 4.0 * n_valid * H * V / P + 3.0 * n_valid * V * isz / B
    return total


def fused_chunk_rows(
    n_valid: int,
    hidden_size: int,
    vocab_size: int,
    *,
    device: str = "cpu",
    itemsize: int = 2,
    low_memory: bool = False,
    chunk_size: Optional[int] = None,
    model: DeviceModel = H200,
) -> int:
    """Valid tokens per chunk of ``fused_linear_gem_loss``: the caller's ``chunk_size`` when given,
    else the policy below. Every chunking of the fused path (the autograd Function's, and under
    vocabulary parallelism the functional layer's, which all ranks must share) comes from here.

    Args:
        n_valid: tokens whose label is not ``ignore_index`` (the chunk count follows them).
        hidden_size, vocab_size: H and V of the lm_head weight [V, H] (V of this rank's shard, or
            the per-rank share of the global V, under vocabulary parallelism).
        device: "cuda" or "cpu" (any other device type uses the CPU policy).
        itemsize: bytes per element of hidden / weight (2 for bf16 / fp16).
        low_memory: the chunking of the low-memory mode's first pass.
        chunk_size: None, or the rows per chunk the caller chose (an int >= 1, validated by
            ``functional.check_options``), returned as it is.
        model: throughputs of the CUDA cost model.

    Returns ``chunk_size`` when given, else an int in [1, max(n_valid, 1)].

    CPU: ``ceil(n_valid * H / V)`` rounded up to a multiple of 16 (memory first: a chunk of logits
    costs about what the valid hidden states cost; the CPU's matmul speed hardly depends on it).

    CUDA: on a GPU the chunk count, not the FLOPs, decides. Each chunk's d weight matmul adds into
    the fp32 [V, H] accumulator, reading and writing 8 x V x H bytes (4.2 GB at Llama-3 8B, about
    1 ms at 4.3 TB/s), and the logits and d hidden matmuls each re-read W; thin chunks also waste
    tensor-core tiles. Measured on an H200 (2026-11-30; this table is the record of that sweep;
    T = 8192 tokens, H = 4096, V = 128,256, bf16, forward + backward, ``triton.testing.do_bench``
    median, ``max_memory_allocated`` above the inputs, fp32 accumulator + a separate bf16 cast at
    the end):

    ========================  ======  =========  ========  =========================
    chunk rows (chunks)         ms    peak GiB   model ms  note
    ========================  ======  =========  ========  =========================
    272 (31, old default)      80.5     3.00       86.7    ceil(T * H / V) -> x16
    512 (16)                   56.7     ~3.0       55.7
    1024 (8)                   48.4     ~3.0       47.6
    2048 (4)                   44.9     ~3.0       43.6
    4096 (2)                   43.4     ~3.0       41.6
    8192 (1)                   42.7     3.9        40.6
    half the tokens ignored    69.7     3.00               (old default, 4096 valid)
    floor 6 x T x H x V        37.6                        at 687 TFLOP/s
    ========================  ======  =========  ========  =========================

    (``model ms`` is :func:`cuda_step_seconds` with the defaults: within 2-5 % from 512 rows up,
    8 % high at 272; it only ranks candidates. It prices this policy's choice at Llama-3 8B,
    8192 tokens, at 45.6 ms: the 2.5 GiB budget, not the model, keeps it above 42 ms.) The policy
    takes the fewest chunks whose logits fit the
    memory budget, ``c <= 3/8 x H`` rows in the default mode (the logits chunk costs at most 3/8 of
    the weight's bytes; ``1/2 x H`` in the low-memory mode's first pass, when no d weight exists
    yet), rounded to 128-row tiles, and among the chunk counts k0 .. k0 + 3 (k0 the fewest that fit)
    the one the model prices lowest. Llama-3 8B, 8192 valid tokens: 6 chunks of 1408 rows, peak
    about 2.4 GiB with the split accumulator of ``autograd/_fused_accumulate.py``; 4096 valid tokens
    (half ignored): 3 chunks of 1408, i.e. the chunk count, and so the time, halves.
    """
    if chunk_size is not None:
        return chunk_size
    n = max(int(n_valid), 0)
    if n == 0:
        return 1
    H, V = max(int(hidden_size), 1), max(int(vocab_size), 1)
    if device != "cuda":
        rows = _round_up(_ceil_div(n * H, V), CPU_ROW_MULTIPLE)
        return max(1, min(rows, n))
    fraction = CUDA_LOW_MEMORY_FRACTION if low_memory else CUDA_LOGITS_FRACTION
    cap = max(CUDA_TILE_ROWS, int(H * fraction) // CUDA_TILE_ROWS * CUDA_TILE_ROWS)
    if n <= cap:
        return n
    k0 = _ceil_div(n, cap)
    best = None
    for k in range(k0, k0 + 4):
        c = min(_round_up(_ceil_div(n, k), CUDA_TILE_ROWS), cap)
        t = cuda_step_seconds(n, H, V, c, itemsize=itemsize, low_memory=low_memory, model=model)
        if best is None or t < best[0] - 1e-12:
            best = (t, c)
    return best[1]


class VocabPassPlan(NamedTuple):
    gather: bool  # gather the valid rows of hidden (else run over all rows, ignored ones giving dZ = 0)
    cols: int  # vocabulary columns per slice


def vocab_pass_plan(n_valid: int, n_tokens: int, hidden_size: int, vocab_size: int) -> VocabPassPlan:
    """The low-memory mode's second pass: per vocabulary slice of ``cols`` columns, the logits of
    every token that takes part ([rows, cols]), dZ over them, then d weight of the slice in one
    matmul over all those tokens. Its temporaries (the gathered valid rows of hidden, if gathered,
    and one [rows, cols] slice) stay within 5/8 of grad_hidden's elements (n_tokens * H * 5/8), so
    the mode's peak is d weight + 1.625 x grad_hidden (+ O(tokens)): 1.08 GiB at Llama-3 8B with
    8192 tokens, below Liger-Kernel's 1.10 GiB (d weight + grad_hidden + a 256-row logits chunk).

    The valid rows are gathered (work proportional to the valid tokens) when they fit with a
    slice of at least min(128, H / 4) columns (so half the tokens valid still gathers); otherwise
    (more than about 60 % valid with some ignored) the pass runs over all tokens and ignored rows
    give zero dZ. cols is a multiple of 128 when >= 128, at least 1 and at most V. Same on every
    device (memory is the point of this mode).
    """
    N, H, V = max(n_tokens, 1), max(hidden_size, 1), max(vocab_size, 1)
    n = max(n_valid, 1)
    budget = N * H * 5 // 8
    gather = n_valid < n_tokens and n * (H + min(CUDA_TILE_ROWS, max(1, H // 4))) <= budget
    rows = n if (gather or n_valid == n_tokens) else N
    room = budget - (n * H if gather else 0)
    cols = max(1, room // rows)
    if cols >= CUDA_TILE_ROWS:
        cols = cols // CUDA_TILE_ROWS * CUDA_TILE_ROWS
    return VocabPassPlan(gather, min(cols, V))


# --- row blocks of the chunked PyTorch GEM path (torch_ops/gem.py) ----------------------------
# CPU: 2^21 fp32 elements = 8 MiB per temporary. Measured at N=2048, V=32,000 on the 2-core
# development machine (python -m benchmarks.torch_path): with 1 thread the block size hardly
# matters (2^18 to 2^21 within 5%); with 2 threads every op ends in a thread barrier, so fewer,
# larger ops win (2^18: 1.97x the time of F.cross_entropy, 2^21: 0.95x under load).
CPU_BLOCK_ELEMENTS = 1 << 21
# CUDA: each of the ~20 element-wise ops per block is a kernel launch (~5-10 us); at 2^21 elements
# (16 rows of a 128k vocabulary) an op moves 8 MiB, ~2 us at 4.3 TB/s, so the path was launch-bound
# (787 ms for the Llama-3 8B lm_head step on an H200:
# gem-fused-torch in docs/gpu-results/2026-11-30-h200-81d598a.md). 2^24 elements (64 MiB per fp32
# temporary, a few live at once) make each op ~15 us of memory traffic, above the launch cost.
CUDA_BLOCK_ELEMENTS = 1 << 24
# A block's fp32 temporaries never exceed 1/MAX_BLOCK_FRACTION of the [N, V] input's bytes (so
# bf16/fp16 inputs get blocks of half as many rows), unless that would make them smaller than
# MIN_BLOCK_ELEMENTS (256 KiB of fp32): below that the per-op overhead costs more than it saves.
MAX_BLOCK_FRACTION = 8
MIN_BLOCK_ELEMENTS = 1 << 16


def torch_block_rows(n_rows: int, vocab_size: int, elsize: int = 4, device: str = "cpu") -> int:
    """Rows per block of the PyTorch GEM path over logits [n_rows, V] of ``elsize`` bytes:
    at most CPU/CUDA_BLOCK_ELEMENTS fp32 elements per temporary and 1/8 of the input's bytes,
    at least MIN_BLOCK_ELEMENTS elements (or all rows), at least 1."""
    V = max(vocab_size, 1)
    cap = CUDA_BLOCK_ELEMENTS if device == "cuda" else CPU_BLOCK_ELEMENTS
    rows = min(cap // V, _ceil_div(n_rows * elsize, 4 * MAX_BLOCK_FRACTION))
    return max(1, rows, min(n_rows, MIN_BLOCK_ELEMENTS // V))
