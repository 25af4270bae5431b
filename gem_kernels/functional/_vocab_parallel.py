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
from typing import Tuple

import torch

from ..autograd.vocab_parallel import VocabShard
from ._checks import check_labels

# Integers each rank contributes to the layout all-gather.
_V_LOCAL, _N_TOKENS, _FAILED, _LABEL_SUM, _LABEL_WSUM = range(5)


def _label_checksums(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two int64 checksums of the labels (plain and position-weighted sum; int64 wrap-around is
    deterministic, so equal labels always give equal sums)."""
    flat = labels.reshape(-1).long()
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.long)
    return flat.sum(), (flat * weights).sum()


def resolve_vocab_shard(process_group, vocab_start, logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int, impl: str, who: str = "gem_loss"):
    """Validate the vocabulary-parallel arguments and this rank's labels.

    Returns (VocabShard passed to the autograd Functions, this rank's vocab_start). ``logits`` is
    the rank's shard [..., V_local] (only its shape, device and leading dims are used).
    """
    if process_group is None:
        raise ValueError(f"{who}: vocab_start is only meaningful with process_group (a vocabulary shard)")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who}: process_group was given but torch.distributed is not initialized; "
                           f"call torch.distributed.init_process_group first")
    if impl == "reference":
        raise ValueError(f"{who}: impl='reference' materialises full rows and does not support "
                         f"process_group; use impl='torch' or 'triton'")
    lead = logits.shape[:-1]
    v_local = logits.shape[-1]
    if vocab_start is not None:
        if not isinstance(vocab_start, numbers.Integral) or isinstance(vocab_start, bool) or vocab_start < 0:
            raise ValueError(f"{who}: vocab_start must be an int >= 0 (global id of this shard's first "
                             f"column), got {vocab_start!r}")
        if v_local < 1:
            raise ValueError(f"{who}: this rank's vocabulary shard must have at least 1 column, got 0")
        check_labels(labels, "logits", lead, logits.device, None, ignore_index)
        return VocabShard(process_group, verify_labels=True), int(vocab_start)

    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    info = torch.zeros(5, dtype=torch.long, device=logits.device)
    info[_V_LOCAL] = v_local
    info[_N_TOKENS] = lead.numel()
    local_error = None
    try:
        check_labels(labels, "logits", lead, logits.device, None, ignore_index)
    except (TypeError, ValueError) as e:
        local_error = e
        info[_FAILED] = 1
    else:
        info[_LABEL_SUM], info[_LABEL_WSUM] = _label_checksums(labels)
    gathered = [torch.empty_like(info) for _ in range(world)]
    dist.all_gather(gathered, info, group=process_group)
    table = torch.stack(gathered).tolist()
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if table[r][_FAILED]]
    if failed:
        raise ValueError(f"{who}: rank(s) {failed} of the process group rejected their inputs (see the "
                         f"error raised there)")
    sizes = [row[_V_LOCAL] for row in table]
    tokens = [row[_N_TOKENS] for row in table]
    if len(set(tokens)) != 1:
        raise ValueError(f"{who}: every rank of the process group must pass the same tokens (only the "
                         f"vocabulary is sharded); got token counts {tokens} on ranks 0..{world - 1}")
    if min(sizes) < 1:
        raise ValueError(f"{who}: every rank's vocabulary shard must have at least 1 column; got shard "
                         f"sizes {sizes} on ranks 0..{world - 1}")
    if len({(row[_LABEL_SUM], row[_LABEL_WSUM]) for row in table}) != 1:
        raise ValueError(f"{who}: labels differ between ranks of the process group; every rank must pass "
                         f"the same (replicated) labels with global vocabulary ids")
    # Labels are replicated (checked above), so this range check fails on every rank alike.
    check_labels(labels, "logits", lead, logits.device, sum(sizes), ignore_index)
    return VocabShard(process_group), sum(sizes[:rank])
