"""benchmarks.traffic.count_traffic on kernels whose exact global-memory traffic is known by hand."""

import pytest
import torch
import triton
import triton.language as tl
from helpers import only_on

from benchmarks.traffic import count_traffic

pytestmark = only_on("cpu", "counts bytes under the Triton interpreter, which is off on a GPU")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scalar_sum_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # One unmasked scalar load per program plus a full-block masked load, then one scalar store.
    pid = tl.program_id(0).to(tl.int64)
    first = tl.load(src_ptr + pid * BLOCK)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + pid, tl.sum(x, 0) + first * 0)


@triton.jit
def _atomic_add_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.atomic_add(out_ptr + offs % 4, tl.load(src_ptr + offs, mask=mask), mask=mask)


def _copy(src, block):
    dst = torch.empty_like(src)
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    return dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("n,block", [(1000, 128), (1024, 256), (7, 64)])
def test_copy_kernel_counts_exact_bytes(dtype, n, block):
    src = torch.arange(n).to(dtype)
    rep = count_traffic(_copy, src, block)
    assert torch.equal(rep.result, src)
    es = src.element_size()
    # Masked-off lanes of the last block move nothing: exactly n elements each way.
    assert rep.loaded_bytes == n * es
    assert rep.stored_bytes == n * es
    assert rep.total_bytes == 2 * n * es
    assert rep.loads == rep.stores == triton.cdiv(n, block)
    assert rep.passes(n, es) == pytest.approx(2.0)


def test_scalar_loads_and_stores_are_counted():
    n, block = 300, 128
    src = torch.randn(n)
    out = torch.empty(triton.cdiv(n, block))

    def run():
        _scalar_sum_kernel[(out.numel(),)](src, out, n, BLOCK=block)
        return out

    rep = count_traffic(run)
    programs = out.numel()
    assert rep.loaded_bytes == (n + programs) * 4
    assert rep.stored_bytes == programs * 4
    torch.testing.assert_close(rep.result, torch.stack([c.sum() for c in src.split(block)]))


def test_atomics_count_read_and_write():
    n, block = 100, 32
    src = torch.ones(n)
    out = torch.zeros(4)

    def run():
        _atomic_add_kernel[(triton.cdiv(n, block),)](src, out, n, BLOCK=block)

    rep = count_traffic(run)
    assert out.sum().item() == n
    assert rep.loaded_bytes == n * 4 + n * 4  # the src load + the read half of each atomic
    assert rep.stored_bytes == n * 4


def test_nested_reports_and_torch_ops_not_counted():
    src = torch.randn(500)

    def outer():
        inner = count_traffic(_copy, src, 128)
        _copy(src * 2, 128)  # the multiply is a torch op: not counted
        return inner

    rep = count_traffic(outer)
    inner = rep.result
    assert inner.total_bytes == 2 * 500 * 4
    assert rep.total_bytes == 2 * inner.total_bytes
    # Outside any count_traffic call nothing accumulates anywhere.
    before = (rep.loaded_bytes, inner.loaded_bytes)
    _copy(src, 128)
    assert (rep.loaded_bytes, inner.loaded_bytes) == before


def test_refuses_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        count_traffic(lambda: None)


@triton.jit
def _twice_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # Every program reads the whole input twice (as a two-pass row kernel does) and writes one block.
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0)
    tl.store(dst_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def test_rereads_within_a_program_are_counted_separately():
    n, block, programs = 1000, 128, 3
    src = torch.randn(n)
    dst = torch.empty(programs * block)

    def run():
        _twice_kernel[(programs,)](src, dst, n, BLOCK=block)

    rep = count_traffic(run)
    # Each program loads n elements twice; only its second pass re-reads what it loaded before.
    # Other programs reading the same addresses are not re-reads (they are separate grid points).
    assert rep.loaded_bytes == programs * 2 * n * 4
    assert rep.reread_bytes == programs * n * 4
    assert rep.stored_bytes == programs * block * 4


def test_streaming_kernels_have_no_rereads():
    src = torch.randn(777)
    rep = count_traffic(_copy, src, 128)
    assert rep.reread_bytes == 0
    rep2 = count_traffic(_copy, src, 128)  # a second launch over the same data is not a re-read
    assert rep2.reread_bytes == 0
