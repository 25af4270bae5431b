"""The chunk policy (gem_kernels/chunk_policy.py) as pure functions of shapes and device kind:
pinned at the benchmark grid's shapes (benchmarks/shapes.py), for CUDA and CPU, without a GPU."""

from __future__ import annotations

import pytest

from benchmarks.shapes import grid
from gem_kernels.chunk_policy import (
    CUDA_TILE_ROWS,
    cuda_step_seconds,
    fused_chunk_rows,
    torch_block_rows,
    vocab_pass_plan,
)

# (model, tokens) -> fused chunk rows at: all tokens valid, half of them valid, low-memory first pass.
CUDA_PINNED = {
    ("llama3", 4096): (1408, 1024, 2048),
    ("llama3", 8192): (1408, 1408, 2048),
    ("llama3", 16384): (1536, 1408, 2048),
    ("qwen2.5", 4096): (1024, 1024, 1408),
    ("qwen2.5", 8192): (1280, 1024, 1664),
    ("qwen2.5", 16384): (1280, 1280, 1664),
    ("gemma2", 4096): (768, 768, 1024),
    ("gemma2", 8192): (768, 768, 1024),
    ("gemma2", 16384): (768, 768, 1152),
}


def _shapes(device):
    return {(s.model.split("/")[0], s.tokens): s for s in grid(device, which="all")}


def test_cuda_choices_at_the_benchmark_grid():
    shapes = _shapes("cuda")
    assert set(shapes) == set(CUDA_PINNED)
    for key, s in shapes.items():
        got = (
            fused_chunk_rows(s.tokens, s.hidden, s.vocab, device="cuda"),
            fused_chunk_rows(s.tokens // 2, s.hidden, s.vocab, device="cuda"),
            fused_chunk_rows(s.tokens, s.hidden, s.vocab, device="cuda", low_memory=True),
        )
        assert got == CUDA_PINNED[key], (key, got)


@pytest.mark.parametrize("n", [1, 100, 1408, 1537, 4096, 8192, 16384, 50_000])
@pytest.mark.parametrize("hv", [(4096, 128_256), (3584, 151_936), (2304, 256_000), (8192, 32_000)])
def test_cuda_rule(n, hv):
    """Within the memory budget (logits chunk <= 3/8 of the weight's bytes: c <= 3/8 H, on 128-row
    tiles), as few chunks as fit (at most 3 more than the minimum), never worse by the model than
    simply taking the largest chunk that fits."""
    H, V = hv
    cap = int(H * 3 / 8) // CUDA_TILE_ROWS * CUDA_TILE_ROWS
    c = fused_chunk_rows(n, H, V, device="cuda")
    if n <= cap:
        assert c == n
        return
    assert c <= cap and c % CUDA_TILE_ROWS == 0
    k, k0 = -(-n // c), -(-n // cap)
    assert k0 <= k <= k0 + 3
    assert cuda_step_seconds(n, H, V, c) <= cuda_step_seconds(n, H, V, cap) + 1e-12
    # memory: one chunk of bf16 logits <= 3/8 of the bf16 weight
    assert c * V * 2 <= 3 / 8 * V * H * 2


def test_cuda_chunk_count_follows_the_valid_tokens():
    """Half the tokens ignored -> half the chunks (the old memory-first policy kept 272-row chunks
    whatever the count, so the per-chunk accumulator traffic did not shrink)."""
    for H, V in [(4096, 128_256), (3584, 151_936), (2304, 256_000)]:
        full, half = 16384, 8192
        chunks = [-(-n // fused_chunk_rows(n, H, V, device="cuda")) for n in (full, half)]
        assert chunks[1] <= (chunks[0] + 1) // 2, (H, V, chunks)


def test_cost_model_matches_the_measured_h200_table():
    """The H200 table in gem_kernels/chunk_policy.py: measured ms per chunk size of the fused lm_head
    step at Llama-3 8B (H = 4096, V = 128,256), 8192 tokens, bf16.
    The model ranks them in the same order and stays within 10 %."""
    measured = {272: 80.5, 512: 56.7, 1024: 48.4, 2048: 44.9, 4096: 43.4, 8192: 42.7}
    model = {c: cuda_step_seconds(8192, 4096, 128_256, c) * 1e3 for c in measured}
    assert sorted(measured, key=measured.get) == sorted(model, key=model.get)
    for c, ms in measured.items():
        assert abs(model[c] - ms) / ms < 0.10, (c, model[c], ms)


def test_cpu_choices_at_the_benchmark_grid():
    """On CPU the measured-best memory-first policy is kept: ceil(n * H / V) rounded up to 16."""
    for (name, tokens), s in _shapes("cpu").items():
        assert fused_chunk_rows(s.tokens, s.hidden, s.vocab, device="cpu") == 16, (name, tokens)
        assert fused_chunk_rows(s.tokens, s.hidden, s.vocab, device="cpu", low_memory=True) == 16
    assert fused_chunk_rows(2048, 256, 32000) == 32  # ceil(16.4) = 17 -> 32
    assert fused_chunk_rows(8192, 4096, 128256) == 272  # ceil(261.6) = 262 -> 272 (CPU)
    assert fused_chunk_rows(10, 4096, 1000) == 10  # never more than the valid tokens
    assert fused_chunk_rows(0, 16, 16) == 1
    assert fused_chunk_rows(0, 16, 16, device="cuda") == 1
    assert fused_chunk_rows(5, 16, 16, device="mps") == 5  # other device kinds: the CPU policy


def test_vocab_pass_plan():
    # all valid: no gather, slices of 5/8 x H columns over all tokens -> [8192, 2560] bf16 = 40 MiB
    assert vocab_pass_plan(8192, 8192, 4096, 128_256) == (False, 2560)
    # half valid: gathered rows (32 MiB) + [4096, 1024] slices (8 MiB) <= 5/8 x grad_hidden
    assert vocab_pass_plan(4096, 8192, 4096, 128_256) == (True, 1024)
    # 70 % valid: gathering would not leave room for a 128-column slice: all rows, zero dZ at ignored
    assert vocab_pass_plan(5734, 8192, 4096, 128_256) == (False, 2560)
    assert vocab_pass_plan(100, 8192, 4096, 128_256) == (True, 128_256)  # capped at V
    assert vocab_pass_plan(0, 0, 16, 10) == (False, 10)
    for n_valid, N, H, V in [
        (4096, 8192, 4096, 128_256),
        (8192, 8192, 2304, 256_000),
        (128, 256, 16, 1000),
        (200, 256, 16, 1000),
        (3, 256, 16, 7),
    ]:
        gather, cols = vocab_pass_plan(n_valid, N, H, V)
        rows = n_valid if gather or n_valid == N else N
        temp = rows * cols + (n_valid * H if gather else 0)
        assert 1 <= cols <= V and (temp <= N * H * 5 // 8 or cols == 1), (n_valid, N, H, V)


def test_torch_block_rows():
    # CPU: today's measured policy (2^21 fp32 elements, 1/8 of the input's bytes, >= 2^16 elements)
    assert torch_block_rows(2048, 32000, 4) == 65
    assert torch_block_rows(2048, 32000, 2) == 65
    assert torch_block_rows(64, 32000, 2) == 4
    assert torch_block_rows(8192, 128_256, 2) == 16
    # CUDA: 2^24 elements per fp32 temporary, the same 1/8 bound: 8x fewer launches at 128k vocab
    assert torch_block_rows(8192, 128_256, 2, "cuda") == 130
    assert torch_block_rows(1408, 128_256, 2, "cuda") == 88
    assert torch_block_rows(1, 10, 4, "cuda") == 1
    for device in ("cpu", "cuda"):
        for n, v, e in [(1, 1, 4), (7, 3, 2), (100_000, 256_000, 2), (3, 1_000_000, 4)]:
            assert 1 <= torch_block_rows(n, v, e, device) <= max(n, 1) or n < 1
