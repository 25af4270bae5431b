"""GEM on DTensor logits sharded over the vocabulary: placements ``Shard(-1)`` on one mesh dimension
(e.g. the output of torch's tensor-parallel ``ColwiseParallel(use_local_output=False)`` lm_head).

``dtensor_gem_loss(logits, labels, **options)`` calls :func:`gem_kernels.gem_loss` on the local
shard with that mesh dimension's process group and the shard's global offset, so the communication
is that of ``gem_loss(process_group=...)`` with an explicit ``vocab_start`` (three all-reduces of
O(tokens) values in the forward, none in the backward). The loss is a plain (replicated) tensor; the
gradient reaches ``logits`` as a DTensor with the same placements.
"""

from __future__ import annotations

from ..functional import gem_loss


def dtensor_gem_loss(logits, labels, **options):
    """GEM of vocabulary-sharded DTensor logits (see the module docstring).

    Args:
        logits: DTensor [..., V] (float32 / bfloat16 / float16) with ``Shard(-1)`` on exactly one mesh
            dimension and ``Replicate()`` on any others.
        labels: the replicated labels [...] with global vocabulary ids (an integer plain tensor, or a
            DTensor whose placements are all ``Replicate()``).
        options: those of gem_loss except ``process_group`` and ``vocab_start``, which come from the
            DTensor.

    Returns: what gem_loss returns (a plain, replicated float32 loss).

    Raises:
        TypeError: logits not a DTensor, or ``process_group`` / ``vocab_start`` given.
        ValueError: other placements, or labels that are not replicated; gem_loss's errors.
        RuntimeError: a local shard whose width is not that of a ``torch.chunk`` split.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard  # imported on use: a heavy optional module

    if not isinstance(logits, DTensor):
        raise TypeError(
            f"dtensor_gem_loss: logits must be a DTensor, got {type(logits).__name__}; "
            f"use gem_loss(process_group=...) for local shards"
        )
    for name in ("process_group", "vocab_start"):
        if name in options:
            raise TypeError(f"dtensor_gem_loss: {name} is taken from the DTensor's mesh and placements")
    ndim = logits.ndim
    placements = tuple(logits.placements)
    vocab_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim % ndim == ndim - 1]
    others_ok = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in vocab_dims)
    if len(vocab_dims) != 1 or not others_ok:
        raise ValueError(
            f"dtensor_gem_loss: logits must be Shard(-1) on one mesh dimension and Replicate() "
            f"on the others, got placements {placements}"
        )
    if isinstance(labels, DTensor):
        if not all(isinstance(p, Replicate) for p in labels.placements):
            raise ValueError(f"dtensor_gem_loss: labels must be replicated, got placements {tuple(labels.placements)}")
        labels = labels.to_local()
    mesh_dim = vocab_dims[0]
    mesh = logits.device_mesh
    n, coord = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    # Shard(-1) splits like torch.chunk: ceil(V / n) columns per rank, the last ones shorter or empty.
    V = logits.shape[-1]
    step = -(-V // n)
    start = min(coord * step, V)
    local = logits.to_local()
    if local.shape[-1] != min(step, V - start):
        raise RuntimeError(
            f"dtensor_gem_loss: local shard has {local.shape[-1]} columns, expected "
            f"{min(step, V - start)} for a torch.chunk split of {V} over {n} ranks"
        )
    return gem_loss(local, labels, process_group=mesh.get_group(mesh_dim), vocab_start=start, **options)


__all__ = ["dtensor_gem_loss"]
