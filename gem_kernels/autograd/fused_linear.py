"""Fused lm_head + GEM: the loss of ``hidden @ weight.T + bias`` without a [tokens, V] tensor.

Only tokens with a label take part: their rows are gathered chunk by chunk, so work and memory
scale with the valid tokens. Per chunk of ``c`` valid rows:

1. ``Z = x_c @ W.T + b`` into one reused [c, V] buffer (the only vocabulary-sized temporary);
2. the GEM forward gives the per-row partial sums, ``finalize`` the loss and row statistics;
3. the GEM backward writes dLoss/dZ over ``Z`` itself (in place). With impl="triton" on one device,
   when the gradients are computed in the forward, steps 2 and 3 are one kernel (gradient in forward,
   ops/gem_fwd_grad.py): each chunk's logits are then read twice (the second read from L2 on a GPU)
   and written once, instead of read by two kernels;
4. ``grad_hidden[rows] = Z @ W``, ``grad_weight += Z.T @ x_c`` and ``grad_bias += Z.sum(0)``, the
   last two accumulated in fp32 across chunks and cast to the parameter dtype once at the end
   (``_fused_accumulate``: for a 2-byte weight the returned gradient's own storage holds half of
   the fp32 sums, so the step never holds the fp32 sums and their cast together).

The chunk size comes from ``chunk_policy.fused_chunk_rows`` (a cost model on CUDA, memory first
on CPU) unless ``chunk_size`` is given. ``low_memory=True`` skips step 4's d weight / d bias and
computes them afterwards per vocabulary slice over all valid tokens (``_fused_low_memory``):
no [V, H] buffer besides the gradient, 8 instead of 6 x valid x H x V FLOPs.

Matmul FLOPs: 2 * valid_tokens * H * V for step 1 and the same for each gradient requested, so
6 * valid_tokens * H * V for hidden + weight gradients.

When the loss is reduced ("mean"/"sum") the upstream gradient is one scalar, so the gradients are
computed during the forward with the reduction's per-token weight folded in, and backward only
multiplies them by (upstream / that weight). With reduction="none" the upstream gradient may
differ per token, and a per-token factor cannot be applied to an already summed grad_weight: the
forward then computes the loss only (2 * valid * H * V FLOPs, keeping [valid, 5] row statistics)
and backward recomputes each chunk's logits and folds the per-token factor into dZ before the
gradient matmuls (another 6 * valid * H * V), i.e. 8 instead of 6 * valid * H * V in all.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch.autograd.function import once_differentiable

from ..chunk_policy import fused_chunk_rows
from ..options import GEMOptions
from ..torch_ops import finalize
from . import vocab_parallel
from ._fused_accumulate import Accumulator
from ._fused_low_memory import vocab_slice_grads
from ._once import take_once
from ._paths import grad_into, partials_fn, triton_ops
from ._scale import scale_grads_, upstream_scale
from .autocast import autocast_off


def _chunk_loop(
    hidden2d,
    weight,
    bias,
    rows,
    labels_v,
    opts: GEMOptions,
    chunk_rows: int,
    *,
    row_grad=None,
    stats_v=None,
    need_gx=False,
    need_gw=False,
    need_gb=False,
    keep_stats=False,
    group=None,
):
    """The chunked pass over the valid rows.

    hidden2d [N, H]; rows [n_valid] int64 (indices of the valid rows) or None when all N are valid;
    labels_v [n_valid]; row_grad [n_valid] fp32 (per-token upstream factor) or None for no
    gradients; stats_v [n_valid, 5] given: skip the GEM forward and the loss (backward
    recomputation); keep_stats: also return the row statistics of the GEM forward.
    group: vocabulary-parallel group (weight is a vocabulary shard): each chunk's partials are
    combined across ranks before its gradients; grad_hidden is then only this shard's contribution
    (the Function all-reduces it).
    Returns (loss [N] or None, extras [N, opts.num_extras] or None (options.X_*), stats_v,
    grad_hidden [N, H] or None, accumulator).
    """
    N, H = hidden2d.shape
    V = weight.shape[0]
    n_valid = labels_v.shape[0]
    dev, dt = hidden2d.device, hidden2d.dtype
    cdt = torch.float64 if dt == torch.float64 else torch.float32
    want_loss = stats_v is None
    loss = torch.zeros(N, dtype=cdt, device=dev) if want_loss else None
    ce = torch.zeros(N, opts.num_extras, dtype=cdt, device=dev) if want_loss and opts.num_extras else None
    grads = row_grad is not None
    need_gx, need_gw, need_gb = grads and need_gx, grads and need_gw, grads and need_gb and bias is not None
    gx = torch.zeros(N, H, dtype=dt, device=dev) if need_gx else None
    acc = Accumulator(weight, bias, need_gw, need_gb, chunk_rows)
    if n_valid == 0:
        return loss, ce, stats_v, gx, acc
    new_stats = [] if keep_stats else None
    c_max = min(chunk_rows, n_valid)
    zbuf = torch.empty(c_max, V, dtype=dt, device=dev)
    xbuf = torch.empty(c_max, H, dtype=dt, device=dev) if rows is not None else None
    gbuf = torch.empty(c_max, H, dtype=dt, device=dev) if rows is not None and need_gx else None
    wt = weight.t()
    partials_of = partials_fn(opts)
    for a in range(0, n_valid, c_max):
        b = min(a + c_max, n_valid)
        c = b - a
        if rows is None:
            x, idx = hidden2d[a:b], None
        else:
            idx = rows[a:b]
            x = torch.index_select(hidden2d, 0, idx, out=xbuf[:c])
        z = zbuf[:c]
        if bias is not None:
            torch.addmm(bias, x, wt, out=z)
        else:
            torch.mm(x, wt, out=z)
        y = labels_v[a:b]
        # Gradient in forward: one kernel gives the chunk's partials and writes dZ over Z (its rows'
        # statistics are complete on one device; a vocabulary shard must combine them first).
        one_kernel = grads and want_loss and group is None and opts.impl == "triton"
        if not want_loss:
            st = stats_v[a:b]
        else:
            if one_kernel:
                partials = triton_ops().gem_forward_grad(z, y, row_grad[a:b].float(), opts, z)
            else:
                partials = vocab_parallel.combined_partials(partials_of, z, y, opts, group)
            l_c, ce_c, st = finalize(partials, y != opts.ignore_index, opts, y)
            if new_stats is not None:
                new_stats.append(st)
            _put(loss, idx, a, b, l_c)
            if ce is not None:
                _put(ce, idx, a, b, ce_c)
        if not grads:
            continue
        if not one_kernel:
            grad_into(z, y, st, row_grad[a:b], opts, z)
        if need_gx:
            if idx is None:
                torch.mm(z, weight, out=gx[a:b])
            else:
                gx.index_copy_(0, idx, torch.mm(z, weight, out=gbuf[:c]))
        acc.add(z, x)
    if new_stats is not None:
        stats_v = torch.cat(new_stats)
    return loss, ce, stats_v, gx, acc


def _put(dst: torch.Tensor, idx: Optional[torch.Tensor], a: int, b: int, src: torch.Tensor) -> None:
    if idx is None:
        dst[a:b] = src
    else:
        dst.index_copy_(0, idx, src.to(dst.dtype))


def valid_rows(labels: torch.Tensor, ignore_index: int):
    """(rows [n_valid] int64 or None when every row is valid, labels of those rows [n_valid]).

    One device-to-host read (a sync on GPU): the valid rows are gathered so that ignored tokens cost
    no matmul work, and the default chunk size depends on their count."""
    valid = labels != ignore_index
    n_valid = int(valid.sum())
    rows = None if n_valid == labels.shape[0] else valid.nonzero().squeeze(1)
    return rows, (labels if rows is None else labels.index_select(0, rows))


class FusedForward(NamedTuple):
    """What :func:`fused_forward` computed: the loss and what a backward needs."""

    loss: torch.Tensor  # [N] fp32 (fp64 for fp64 input)
    ce: Optional[torch.Tensor]  # [N] or None
    eager: bool  # gradients precomputed (``grads``) with the per-token weight token_scale
    grads: Optional[tuple]  # (grad_hidden, grad_weight, grad_bias), each None when not required
    rows: Optional[torch.Tensor]  # [n_valid] int64 indices of the valid rows, None when all are valid
    labels_v: torch.Tensor  # [n_valid]
    stats_v: Optional[torch.Tensor]  # [n_valid, 5] row statistics (deferred gradients only)
    chunk_rows: int


def fused_forward(
    hidden2d, weight, bias, labels, opts: GEMOptions, token_scale, group, need_gx: bool, need_gw: bool, need_gb: bool
) -> FusedForward:
    """The forward of the fused path (shared by FusedLinearGEMFunction and the torch.compile custom
    operators in ``compiled_fused.py``). See FusedLinearGEMFunction for the arguments."""
    any_grad = need_gx or need_gw or need_gb
    rows, labels_v = valid_rows(labels, opts.ignore_index)
    n_valid = labels_v.shape[0]
    chunk_rows = fused_chunk_rows(
        n_valid,
        hidden2d.shape[1],
        weight.shape[0],
        device=hidden2d.device.type,
        itemsize=hidden2d.element_size(),
        low_memory=opts.low_memory,
        chunk_size=opts.chunk_size,
    )
    # fp16 defers too: dZ must carry the upstream gradient (e.g. GradScaler's 2^16) before it is
    # rounded to fp16, or its small entries underflow; the upstream is only known in backward.
    eager = any_grad and token_scale is not None and hidden2d.dtype != torch.float16
    row_grad = None
    if eager:
        cdt = torch.float64 if hidden2d.dtype == torch.float64 else torch.float32
        ts = torch.as_tensor(token_scale, dtype=cdt, device=hidden2d.device)
        row_grad = ts.reshape(()).expand(n_valid)
    # Low-memory mode: the chunk loop makes only d hidden (no dZ at all when d hidden is not needed);
    # it keeps the row statistics for the vocabulary pass.
    low_memory = opts.low_memory
    loop_grad = None if low_memory and not need_gx else row_grad
    loss, ce, stats_v, gx, acc = _chunk_loop(
        hidden2d,
        weight,
        bias,
        rows,
        labels_v,
        opts,
        chunk_rows,
        row_grad=loop_grad,
        need_gx=need_gx,
        need_gw=need_gw and not low_memory,
        need_gb=need_gb and not low_memory,
        keep_stats=any_grad and (low_memory or not eager),
        group=group,
    )
    grads = None
    if eager:
        _sum_over_shards(gx, group)
        gw, gb = acc.result()
        if low_memory:
            gw, gb = vocab_slice_grads(
                hidden2d, weight, bias, rows, labels_v, stats_v, row_grad, opts, need_gw=need_gw, need_gb=need_gb
            )
        grads = (gx, gw, gb)
    return FusedForward(loss, ce, eager, grads, rows, labels_v, stats_v, chunk_rows)


def fused_backward_recompute(
    hidden2d, weight, bias, rows, labels_v, stats_v, grad_loss, opts: GEMOptions, chunk_rows: int, flags, group=None
):
    """Deferred gradients (reduction "none", fp16): recompute each chunk's logits from the saved row
    statistics and fold the per-token upstream ``grad_loss`` [N] into dZ. Returns (gx, gw, gb).
    Low-memory mode: the chunks give d hidden only, the vocabulary pass d weight / d bias."""
    need_gx, need_gw, need_gb = flags
    row_grad = grad_loss if rows is None else grad_loss.index_select(0, rows)
    gx = gw = gb = None
    low_memory = opts.low_memory
    if need_gx or not low_memory:  # low-memory mode without d hidden: no token-chunk pass at all
        _, _, _, gx, acc = _chunk_loop(
            hidden2d,
            weight,
            bias,
            rows,
            labels_v,
            opts,
            chunk_rows,
            row_grad=row_grad,
            stats_v=stats_v,
            need_gx=need_gx,
            need_gw=need_gw and not low_memory,
            need_gb=need_gb and not low_memory,
        )
        _sum_over_shards(gx, group)
        gw, gb = acc.result()
    if low_memory:
        gw, gb = vocab_slice_grads(
            hidden2d, weight, bias, rows, labels_v, stats_v, row_grad, opts, need_gw=need_gw, need_gb=need_gb
        )
    return gx, gw, gb


class FusedLinearGEMFunction(torch.autograd.Function):
    """(hidden2d [N, H], weight [V, H], bias [V] | None, labels [N], opts, token_scale, group,
    grad_enabled) -> (per-token loss [N], detached per-token extras [N, opts.num_extras]
    (options.X_*) or empty), fp32 (fp64 for fp64 input).

    ``token_scale`` is d(reduced loss)/d(per-token loss) (a float or 0-d tensor: 1/count for
    "mean", 1 for "sum"): the gradients are then computed in forward with that factor and backward
    rescales them by upstream/token_scale. ``token_scale=None`` (reduction "none") defers all
    gradient work to backward (see the module docstring). ``opts.impl`` is "triton" or "torch";
    ``opts.chunk_size`` None: ``chunk_policy.fused_chunk_rows`` for this device; ``opts.low_memory``:
    d weight / d bias come from a second pass over vocabulary slices (``_fused_low_memory``) instead
    of the fp32 accumulator. ``grad_enabled``: the caller's grad mode (off inside forward).

    Host reads: one, of the valid-token count per forward (``valid_rows``: the chunking, and the
    gathering of valid rows, are sized by it: this is what makes ignored tokens cost nothing).
    """

    @staticmethod
    def forward(
        ctx,
        hidden2d,
        weight,
        bias,
        labels,
        opts: GEMOptions,
        token_scale: Union[None, float, torch.Tensor],
        group=None,
        grad_enabled: bool = True,
    ):
        # Under torch.no_grad() no backward can follow: compute the loss only.
        need_gx = grad_enabled and ctx.needs_input_grad[0]
        need_gw = grad_enabled and ctx.needs_input_grad[1]
        need_gb = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        fwd = fused_forward(hidden2d, weight, bias, labels, opts, token_scale, group, need_gx, need_gw, need_gb)
        ctx.opts, ctx.chunk_rows = opts, fwd.chunk_rows
        ctx.flags = (need_gx, need_gw, need_gb)
        ctx.group = group
        ctx.device_type = hidden2d.device.type
        ctx.eager = fwd.eager
        if fwd.eager:
            ctx.grads = fwd.grads
            ctx.token_scale = token_scale
            ctx.rows = fwd.rows
        elif need_gx or need_gw or need_gb:
            # Deferred: keep what a recomputation needs (references, plus O(tokens) statistics).
            ctx.save_for_backward(hidden2d, weight, bias, fwd.rows, fwd.labels_v, fwd.stats_v)
        loss, ce = fwd.loss, fwd.ce
        if ce is None:
            ce = loss.new_empty(0)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    @once_differentiable  # the gradients come from kernels / no_grad code: no double backward
    def backward(ctx, grad_loss, _grad_extras):
        with autocast_off(ctx.device_type):  # backward may run inside the caller's autocast block
            grads = FusedLinearGEMFunction._backward(ctx, grad_loss)
        return tuple(grads) + (None,) * 4  # opts, token_scale, group, grad_enabled

    @staticmethod
    def _backward(ctx, grad_loss):
        """(grad_hidden, grad_weight, grad_bias, None for labels), each None when not required."""
        if ctx.eager:
            grads = take_once(
                ctx,
                "grads",
                "fused_linear_gem_loss scales its precomputed gradients in place and "
                "supports one backward per forward; run the forward again instead of retain_graph=True",
            )
            if grad_loss is None:
                for g in grads:
                    if g is not None:
                        g.zero_()
            else:
                # No host read: the factor stays a 0-d device tensor (see scale_grads_ for precision).
                scale_grads_(grads, upstream_scale(grad_loss, ctx.rows, ctx.token_scale))
            return tuple(grads) + (None,)
        hidden2d, weight, bias, rows, labels_v, stats_v = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros(hidden2d.shape[0], dtype=torch.float32, device=hidden2d.device)
        grads = fused_backward_recompute(
            hidden2d, weight, bias, rows, labels_v, stats_v, grad_loss, ctx.opts, ctx.chunk_rows, ctx.flags, ctx.group
        )
        return tuple(grads) + (None,)


def _sum_over_shards(gx: Optional[torch.Tensor], group) -> None:
    """Vocabulary parallel: each rank's grad_hidden holds only its vocabulary slice's contribution
    (dZ_shard @ W_shard); the full gradient is their sum, one all-reduce of [N, H]."""
    if gx is None or group is None:
        return
    import torch.distributed as dist

    dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=getattr(group, "group", group))
