"""Validation and shard layout for vocabulary-parallel calls (``process_group=``, ``vocab_start=``).

Default layout: one all-gather of a few integers per rank gives every rank every shard size, so
each rank's offset is the sum of the sizes of the ranks before it (in group rank order), the
global vocabulary V is their sum, and inconsistencies (token counts, labels that differ between
ranks, an empty shard, a rank whose inputs failed local checks) are detected on every rank alike,
so all ranks raise together instead of leaving some waiting in a collective.

With an explicit ``vocab_start`` that all-gather is skipped (the layout is trusted; cross-rank
shape mismatches are not detected) and label ranges are checked during the forward instead, by
counting in the existing t_y all-reduce how many shards hold each label (must be exactly one).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import torch

from ..autograd.vocab_parallel import VocabShard
from ..chunk_policy import fused_chunk_rows
from ._checks import check_labels

# Integers each rank contributes to the layout all-gather.
_V_LOCAL, _N_TOKENS, _FAILED, _LABEL_SUM, _LABEL_WSUM = range(5)


def _label_checksums(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two int64 checksums of the labels (plain and position-weighted sum; int64 wrap-around is
    deterministic, so equal labels always give equal sums)."""
    flat = labels.reshape(-1).long()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.long)
    return flat.sum(), (flat * weights).sum()


class ShardLayout(NamedTuple):
    shard: VocabShard  # what the autograd Functions receive as ``group``
    vocab_start: int  # global id of this rank's first column
    vocab_size: Optional[int]  # global V (None when vocab_start was given: not known without a collective)


def resolve_vocab_shard(
    process_group,
    vocab_start,
    lead: torch.Size,
    v_local: int,
    device,
    labels: torch.Tensor,
    ignore_index: int,
    impl: str,
    who: str = "gem_loss",
    name: str = "logits",
) -> ShardLayout:
    """Validate the vocabulary-parallel arguments and this rank's labels.

    ``lead`` is the token shape of ``name`` (logits [..., V_local] or hidden [..., H]), ``v_local``
    this rank's number of vocabulary columns.
    """
    if process_group is None:
        raise ValueError(f"{who}: vocab_start is only meaningful with process_group (a vocabulary shard)")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who}: process_group was given but torch.distributed is not initialized; "
            f"call torch.distributed.init_process_group first"
        )
    if impl == "reference":
        raise ValueError(
            f"{who}: impl='reference' materialises full rows and does not support "
            f"process_group; use impl='torch' or 'triton'"
        )
    if vocab_start is not None:
        if not isinstance(vocab_start, numbers.Integral) or isinstance(vocab_start, bool) or vocab_start < 0:
            raise ValueError(
                f"{who}: vocab_start must be an int >= 0 (global id of this shard's first column), got {vocab_start!r}"
            )
        if v_local < 1:
            raise ValueError(f"{who}: this rank's vocabulary shard must have at least 1 column, got 0")
        check_labels(labels, name, lead, device, None, ignore_index)
        return ShardLayout(VocabShard(process_group, verify_labels=True), int(vocab_start), None)

    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    info = torch.zeros(5, dtype=torch.long, device=_collective_device(process_group))
    info[_V_LOCAL] = v_local
    info[_N_TOKENS] = lead.numel()
    local_error = None
    try:
        check_labels(labels, name, lead, device, None, ignore_index)
    except (TypeError, ValueError) as e:
        local_error = e
        info[_FAILED] = 1
    else:
        info[_LABEL_SUM:] = torch.stack(_label_checksums(labels)).to(info.device)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=process_group)
    table = torch.stack(gathered).tolist()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if table[r][_FAILED]]
    if failed:
        raise ValueError(
            f"{who}: rank(s) {failed} of the process group rejected their inputs (see the error raised there)"
        )
    sizes = [row[_V_LOCAL] for row in table]
    tokens = [row[_N_TOKENS] for row in table]
    if len(set(tokens)) != 1:
        raise ValueError(
            f"{who}: every rank of the process group must pass the same tokens (only the "
            f"vocabulary is sharded); got token counts {tokens} on ranks 0..{world - 1}"
        )
    if min(sizes) < 1:
        raise ValueError(
            f"{who}: every rank's vocabulary shard must have at least 1 column; got shard "
            f"sizes {sizes} on ranks 0..{world - 1}"
        )
    if len({(row[_LABEL_SUM], row[_LABEL_WSUM]) for row in table}) != 1:
        raise ValueError(
            f"{who}: labels differ between ranks of the process group; every rank must pass "
            f"the same (replicated) labels with global vocabulary ids"
        )
    # Labels are replicated (checked above), so this range check fails on every rank alike.
    check_labels(labels, name, lead, device, sum(sizes), ignore_index)
    return ShardLayout(VocabShard(process_group), sum(sizes[:rank]), sum(sizes))


def shard_chunk_rows(
    layout: ShardLayout,
    n_valid: int,
    hidden_size: int,
    v_local: int,
    device: str = "cpu",
    itemsize: int = 2,
    low_memory: bool = False,
) -> int:
    """Default rows per chunk of the fused path under a process group. Every chunk runs collectives,
    so all ranks must use the same chunking: it is derived from replicated quantities (valid tokens,
    H, the global V over the world size), never from the local shard size, with the policy of
    ``chunk_policy.fused_chunk_rows`` for the device kind. With an explicit vocab_start the global V
    costs one all-reduce of one integer (pass chunk_size to avoid it)."""
    import torch.distributed as dist

    group = layout.shard.group
    vocab = layout.vocab_size
    if vocab is None:
        total = torch.tensor([v_local], dtype=torch.long, device=_collective_device(group))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        vocab = int(total.item())
    world = dist.get_world_size(group)
    return fused_chunk_rows(
        n_valid, hidden_size, -(-vocab // world), device=device, itemsize=itemsize, low_memory=low_memory
    )


def _collective_device(group) -> torch.device:
    """NCCL needs CUDA tensors; every other backend here takes CPU ones."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
