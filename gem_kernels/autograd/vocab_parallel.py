"""Combining per-shard partial sums across a vocabulary-parallel process group.

Under vocabulary (tensor) parallelism rank r holds the columns [vocab_start_r, vocab_start_r + V_r)
of every logits row. A row's forward statistics are a max and sums over the vocabulary, so they
combine exactly (e_j = exp((t_j - m) / beta), t = transformed logits, t_y = label logit):

    t_y = sum_r [y in shard r] t_y                        all-reduce SUM  [N]  (exactly one term is non-zero)
    m   = max_r m_r                                       all-reduce MAX  [N]
    s_k = sum_r s_k,r exp((m_r - m) / beta), k = 0, 1, 2  all-reduce SUM  [N, 2..4]
    sce = sum_r sce_r exp(m_r - m)                        (same all-reduce)
    sent = sum_r exp(m_r - m) (sent_r + (m_r - m) sce_r)  (same all-reduce; return_metrics only)
    amax = min_r {amax_r : m_r = m}                       all-reduce MIN  [N]  (return_metrics only)

(sent_r = sum exp(t_j - m_r)(t_j - m_r) is re-centred on the global max; amax_r is the global id
of the shard's first maximal column, so the combined arg-max is the lowest global index among the
equal maxima, the same tie rule as one device.)

t_y travels first because each shard's pass needs it (s2 = sum e w (t - t_y), and the logsigmoid
weight depends on it). That is three all-reduces of O(tokens) values per forward, never O(V); the
backward needs none (each rank's gradient columns depend only on its own logits and the global
row statistics). The combined partials are identical on every rank, so every rank computes the same
loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..options import P_AMAX, P_M, P_S0, P_S1, P_S2, P_SCE, P_SENT, P_TY, GEMOptions
from ..torch_ops import label_columns


@dataclass(frozen=True)
class VocabShard:
    """What the autograd Functions receive as ``group`` under vocabulary parallelism.

    ``group`` is the torch.distributed process group. With ``verify_labels`` (set when the caller
    gave ``vocab_start`` explicitly, so no shard-size all-gather validated the layout) the t_y
    all-reduce also counts, per token, how many shards hold its label; anything but exactly one
    raises on every rank.
    """

    group: Any
    verify_labels: bool = False


def combined_partials(partials_fn, logits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions, group):
    """partials [N, opts.num_partials] of the full (global) rows. With group None this is just partials_fn.

    ``partials_fn(logits, labels, opts, label_logits=None) -> partials [N, opts.num_partials]`` is the shard's
    single-pass forward (``ops.gem_forward`` or ``torch_ops.gem_partials``); ``opts.vocab_start`` is the
    global id of this shard's first column. ``group`` is None, a :class:`VocabShard` or a process group.
    """
    if group is None:
        return partials_fn(logits, labels, opts)
    import torch.distributed as dist

    shard = group if isinstance(group, VocabShard) else VocabShard(group)
    ty, inside = shard_label_logits(partials_fn, logits, labels, opts)
    if shard.verify_labels:
        both = torch.stack([ty, inside.to(ty.dtype)], 1)
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=shard.group)
        ty = both[:, 0].contiguous()
        _check_label_coverage(both[:, 1], labels, opts)
    else:
        dist.all_reduce(ty, op=dist.ReduceOp.SUM, group=shard.group)
    partials = partials_fn(logits, labels, opts, label_logits=ty)
    return combine_shard_partials(partials, ty, opts, shard.group)


def shard_label_logits(partials_fn, logits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions):
    """(t_y [N] in the partials' dtype, 0 where the label is not in this shard or ignored; inside [N] bool).

    The raw label logit is gathered and run through ``partials_fn`` as a one-column row, so t_y goes
    through exactly the transform code of the shard's own pass (bit-identical to single device).
    """
    col, inside = label_columns(labels.long(), opts, logits.shape[1])
    z_y = logits.gather(1, col[:, None])
    # The one column sits at global id `marker`; pick one that is not the ignore_index.
    marker = 0 if opts.ignore_index != 0 else 1
    col_labels = torch.full_like(labels, opts.ignore_index).masked_fill_(inside, marker)
    col_opts = dataclasses.replace(opts, vocab_start=marker, return_ce=False, return_metrics=False, z_loss_scale=0.0)
    ty = partials_fn(z_y, col_labels, col_opts)[:, P_TY]
    return torch.where(inside, ty, torch.zeros((), dtype=ty.dtype, device=ty.device)), inside


def combine_shard_partials(partials: torch.Tensor, ty: torch.Tensor, opts: GEMOptions, group) -> torch.Tensor:
    """Per-shard partials [N, opts.num_partials] (with the global t_y already used in the pass) ->
    global partials.

    Two all-reduces: MAX of m [N], then SUM of the rescaled sums [N, 2..5] (s1 only for logsigmoid,
    sce only when the log-sum-exp is needed, sent only with return_metrics), plus, with
    return_metrics, a MIN of the arg-max candidates [N]. A row with m_r = -inf (empty shard row, all
    -inf logits, ignored row) contributes 0, never NaN.
    """
    import torch.distributed as dist

    m = partials[:, P_M]
    absent = m == float("-inf")
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    # m <= m_all, so both factors are in [0, 1]; where() keeps the -inf - -inf NaN out.
    scale_q = torch.where(absent, zero, torch.exp((m - m_all) * (1.0 / opts.beta)))
    cols = [P_S0] + ([P_S1] if opts.logsigmoid else []) + [P_S2]
    scales = [scale_q] * len(cols)
    if opts.need_lse:
        scale_ce = torch.where(absent, zero, torch.exp(m - m_all))
        cols.append(P_SCE)
        scales.append(scale_ce)
    sums = partials[:, cols].masked_fill(absent[:, None], 0.0)  # the torch path leaves NaN there
    if opts.return_metrics:
        # Re-centre sent_r on the global max: exp(m_r - m)(sent_r + (m_r - m) sce_r).
        shift = torch.where(absent, zero, (m - m_all) * partials[:, P_SCE])
        sent = torch.where(absent, zero, partials[:, P_SENT] + shift)
        cols.append(P_SENT)
        scales.append(scale_ce)
        sums = torch.cat([sums, sent[:, None]], 1)
    sums.mul_(torch.stack(scales, 1))
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    out = torch.zeros_like(partials)
    out[:, P_M] = m_all
    out[:, cols] = sums
    if opts.return_metrics:
        # Only shards that reach the global max offer their first maximal index; the lowest wins.
        big = torch.full((), float("inf"), dtype=m.dtype, device=m.device)
        amax = torch.where(~absent & (m == m_all), partials[:, P_AMAX], big)
        dist.all_reduce(amax, op=dist.ReduceOp.MIN, group=group)
        out[:, P_AMAX] = torch.where(torch.isinf(amax), -1.0, amax)
    if not opts.logsigmoid:
        out[:, P_S1] = out[:, P_S0]
    out[:, P_TY] = ty
    return out


def _check_label_coverage(hits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions) -> None:
    """Every non-ignored label must lie in exactly one shard. ``hits`` is all-reduced, so every
    rank reaches the same verdict and raises together (no rank is left waiting in a collective)."""
    bad = (labels != opts.ignore_index) & (hits != 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"gem_loss: label {int(labels[i])} (token {i}) lies in {int(hits[i])} vocabulary shards of the "
            f"process group, expected exactly 1: with an explicit vocab_start the shards "
            f"[vocab_start, vocab_start + V_local) must tile [0, V) without gaps or overlaps, and every "
            f"label must lie in [0, V) or equal ignore_index={opts.ignore_index}"
        )
