"""Turn per-row partial sums into the loss, the CE value and the statistics the backward needs.

Shared by the Triton and torch paths (and by the vocab-parallel path, which all-reduces the
partials first). Everything here is O(tokens).
"""

from __future__ import annotations

import torch

from ..options import (
    NUM_STATS,
    P_AMAX,
    P_M,
    P_S0,
    P_S1,
    P_S2,
    P_SCE,
    P_SENT,
    P_TY,
    S_LOGS0,
    S_LSE,
    S_M,
    S_TY,
    S_YCOEF,
    X_ACC,
    X_CE,
    X_ENTROPY,
    GEMOptions,
)


def finalize(partials: torch.Tensor, valid: torch.Tensor, opts: GEMOptions, labels=None):
    """partials [N, opts.num_partials] fp32 (see options.P_*), valid [N] bool ->
    (loss [N] fp32, extras [N, opts.num_extras] fp32 or None, stats [N, 5] fp32 (see options.S_*)).

    loss = s2 / s0 (+ z_loss_scale * lse^2). extras (options.X_*), all 0 at ignored rows:
    ce = lse - t_y; with return_metrics also the entropy log(sce) - sent / sce and the token
    accuracy [amax == label], which needs ``labels`` [N] (global ids).
    """
    m, s0, s1, s2, sce, ty = (partials[:, i] for i in (P_M, P_S0, P_S1, P_S2, P_SCE, P_TY))
    one = torch.ones((), dtype=s0.dtype, device=s0.device)
    zero = torch.zeros((), dtype=s0.dtype, device=s0.device)
    s0_safe = torch.where(valid, s0, one)
    loss = torch.where(valid, s2 / s0_safe, zero)
    stats = torch.zeros(partials.shape[0], NUM_STATS, dtype=partials.dtype, device=partials.device)
    stats[:, S_M] = torch.where(valid, m, zero)
    stats[:, S_LOGS0] = torch.log(s0_safe)
    stats[:, S_YCOEF] = torch.where(valid, s1 / s0_safe, zero)
    stats[:, S_TY] = torch.where(valid, ty, zero)
    extras = None
    if opts.need_lse:
        sce_safe = torch.where(valid, sce, one)
        lse = torch.where(valid, m + torch.log(sce_safe), zero)
        stats[:, S_LSE] = lse
        if opts.z_loss_scale:
            loss = loss + opts.z_loss_scale * lse * lse
        if opts.num_extras:
            extras = torch.zeros(partials.shape[0], opts.num_extras, dtype=partials.dtype, device=partials.device)
            extras[:, X_CE] = torch.where(valid, lse - ty, zero)
        if opts.return_metrics:
            if labels is None:
                raise ValueError("finalize: return_metrics needs the labels")
            ent = torch.log(sce_safe) - partials[:, P_SENT] / sce_safe
            extras[:, X_ENTROPY] = torch.where(valid, ent, zero)
            hit = partials[:, P_AMAX] == labels.to(partials.dtype)
            extras[:, X_ACC] = (valid & hit).to(partials.dtype)
    return loss, extras, stats
