"""Pure-PyTorch GEM over blocks of rows: what CPU users run, and the same math as the Triton kernels.

Rows are processed in row blocks sized by ``chunk_policy.torch_block_rows`` (per device: 8 MiB fp32
temporaries on CPU, 64 MiB on CUDA, and at most an eighth of the input's bytes each), so the extra
memory is a few blocks (never another [N, V] tensor beyond the gradient itself). ("Row blocks" here;
"chunks" are the fused lm_head path's chunks of valid tokens.)
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..chunk_policy import torch_block_rows
from ..options import (
    LOGSIGMOID_TEMPERATURE,
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
    GEMOptions,
)
from .stats import finalize


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _transform(z: torch.Tensor, opts: GEMOptions) -> torch.Tensor:
    """t = softcap * tanh(logit_scale * z / softcap), upcast to fp32. May alias z: never write to it."""
    t = z.to(_compute_dtype(z.dtype))
    if opts.softcap is not None:
        return torch.mul(t, opts.logit_scale / opts.softcap).tanh_().mul_(opts.softcap)
    if opts.logit_scale != 1.0:
        return t * opts.logit_scale
    return t


def _chain(g: torch.Tensor, t: torch.Tensor, opts: GEMOptions) -> None:
    """g *= dt/dz in place."""
    if opts.softcap is not None:
        # d/dz [c tanh(s z / c)] = s (1 - tanh^2) = s (1 - (t / c)^2)
        g.mul_(torch.div(t, opts.softcap).square_().neg_().add_(1.0).mul_(opts.logit_scale))
    elif opts.logit_scale != 1.0:
        g.mul_(opts.logit_scale)


def label_columns(labels: torch.Tensor, opts: GEMOptions, V: int):
    """Where each row's label sits among these V columns (global ids [opts.vocab_start,
    opts.vocab_start + V)): (column [R] int, 0 where it is not here; inside [R] bool, False for
    ignored rows and for labels of another vocabulary shard)."""
    local = labels - opts.vocab_start
    inside = (labels != opts.ignore_index) & (local >= 0) & (local < V)
    return torch.where(inside, local, torch.zeros_like(local)), inside


def _label_logit(t: torch.Tensor, labels: torch.Tensor, opts: GEMOptions):
    """(t_y [R] with 0 where the label is not in this tensor, column index [R], in-tensor mask [R])."""
    col, inside = label_columns(labels, opts, t.shape[1])
    ty = torch.where(inside, t.gather(1, col[:, None]).squeeze(1), torch.zeros((), dtype=t.dtype))
    return ty, col, inside


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij b_ij without a temporary (batched BLAS dot)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _row_block(z, labels, opts: GEMOptions, ty_given, grad_out: Optional[torch.Tensor]):
    """One block of rows. Returns partials [R, opts.num_partials], and writes the gradient into grad_out
    if given."""
    t = _transform(z, opts)
    ty, col, inside = _label_logit(t, labels, opts)
    if ty_given is not None:
        ty = ty_given.to(t.dtype)
    if opts.return_metrics:
        # One reduction gives the max and its first index (torch.max documents the first maximal
        # index, i.e. ties go to the lowest column); amax alone is cheaper when it is not needed.
        m, first_max = t.max(1, keepdim=True)
    else:
        m = t.amax(1, keepdim=True)
    d = t - m
    # e = exp((t - m) / beta), built where the gradient will live when dtypes allow, to save a copy.
    direct = grad_out is not None and grad_out.dtype == t.dtype and grad_out.is_contiguous()
    e = torch.mul(d, 1.0 / opts.beta, out=grad_out) if direct else torch.mul(d, 1.0 / opts.beta)
    e.exp_()
    s0 = e.sum(1)
    if opts.logsigmoid:
        e.mul_(torch.sub(t, ty[:, None]).mul_(1.0 / LOGSIGMOID_TEMPERATURE).sigmoid_())
        s1 = e.sum(1)
    else:
        s1 = s0
    m1 = m.squeeze(1)
    s2 = _rowdot(e, d)
    if torch.isnan(s2).any():  # -inf logits: 0 * -inf in the dot; clamp and redo (rare)
        s2 = _rowdot(e, d.clamp(min=torch.finfo(d.dtype).min))
    s2 = s2 + (m1 - ty) * s1
    partials = torch.zeros(t.shape[0], opts.num_partials, dtype=t.dtype, device=t.device)
    partials[:, P_M], partials[:, P_S0], partials[:, P_S1], partials[:, P_S2], partials[:, P_TY] = m1, s0, s1, s2, ty
    if opts.return_metrics:
        # One more block temporary, only when asked: the entropy needs exp(t - m) and t - m at once.
        ed = torch.exp(d)
        partials[:, P_SCE] = ed.sum(1)
        # d is not needed after this, so the product goes into it; nansum drops exactly the
        # 0 * -inf = NaN terms of -inf logits (a masked vocabulary), which must add 0.
        partials[:, P_SENT] = torch.nansum(d.mul_(ed), 1)
        partials[:, P_AMAX] = first_max.squeeze(1).to(t.dtype) + opts.vocab_start
        d = ed  # what the z-loss gradient below expects
    elif opts.need_lse:
        d.exp_()  # d now holds exp(t - m)
        partials[:, P_SCE] = d.sum(1)
    if grad_out is None:
        return partials
    valid = labels != opts.ignore_index
    _, _, stats = finalize(partials, valid, opts, labels)
    inv_s0 = torch.where(valid, torch.exp(-stats[:, S_LOGS0]), torch.zeros((), dtype=t.dtype))
    e.mul_(inv_s0[:, None])  # q * w
    e.scatter_add_(1, col[:, None], torch.where(inside, -stats[:, S_YCOEF], 0.0)[:, None])
    if opts.z_loss_scale:
        lse = stats[:, S_LSE]
        coef = torch.where(valid, 2.0 * opts.z_loss_scale * lse * torch.exp(m1 - lse), 0.0)
        e.add_(d.mul_(coef[:, None]))  # 2 s lse softmax(t)
    _chain(e, t, opts)
    if not direct:
        grad_out.copy_(e)
    return partials


def _row_blocks(N: int, V: int, elsize: int = 4, device: str = "cpu"):
    step = torch_block_rows(N, V, elsize, device)
    for start in range(0, N, step):
        yield start, min(start + step, N)


def gem_partials(
    logits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions, label_logits: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-row partial sums [N, opts.num_partials] (options.P_*), the same shape of call as the
    Triton launcher ``ops.gem_forward``: logits [N, V] (unit column stride), labels [N], and
    ``label_logits`` [N] (t_y given: a vocabulary shard) or None."""
    return gem_forward_row_blocks(logits, labels, opts, label_logits=label_logits)[0]


def gem_forward_row_blocks(
    logits: torch.Tensor,
    labels: torch.Tensor,
    opts: GEMOptions,
    *,
    label_logits: Optional[torch.Tensor] = None,
    compute_grad: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """logits [N, V] (row stride free, unit column stride), labels [N] ->
    (partials [N, opts.num_partials] in the compute dtype, grad [N, V] in logits.dtype or None).

    With ``compute_grad`` the gradient of each row's loss (upstream gradient 1) is computed in the
    same pass; it needs the finished row statistics, so it is only for single-device use.
    ``label_logits`` [N] supplies t_y (vocab-parallel: the label may sit on another shard).
    Rows with ignored labels are skipped and get zero gradient.
    """
    N, V = logits.shape
    cdt = _compute_dtype(logits.dtype)
    partials = torch.zeros(N, opts.num_partials, dtype=cdt, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    valid = labels != opts.ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        if grad is not None:
            grad.zero_()
        return partials, grad
    rows = None
    if n_valid < N:
        rows = valid.nonzero().squeeze(1)
        if grad is not None:
            grad[~valid] = 0
    for a, b in _row_blocks(n_valid, V, logits.element_size(), logits.device.type):
        if rows is None:
            z, y, sl = logits[a:b], labels[a:b], slice(a, b)
        else:
            sl = rows[a:b]
            z, y = logits.index_select(0, sl), labels.index_select(0, sl)
        tyg = None if label_logits is None else label_logits[sl]
        if grad is not None and rows is None:
            partials[sl] = _row_block(z, y, opts, tyg, grad[sl])
        elif grad is not None:
            buf = torch.empty(z.shape, dtype=grad.dtype, device=grad.device)
            partials[sl] = _row_block(z, y, opts, tyg, buf)
            grad.index_copy_(0, sl, buf)
        else:
            partials[sl] = _row_block(z, y, opts, tyg, None)
    return partials, grad


def gem_grad_row_blocks(
    logits: torch.Tensor,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_loss: torch.Tensor,
    opts: GEMOptions,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient from saved statistics: logits [N, V], labels [N], stats [N, 5] (options.S_*),
    grad_loss [N] (may be a 0-stride expanded scalar) -> grad [N, V] in logits.dtype, written to
    ``out`` when given (``out`` may be ``logits`` itself: each block is read before it is written).

    d loss/d t_k = q_k w_k - [k == y] y_coef + 2 s lse softmax(t)_k, then chained through the
    logit transforms and scaled by grad_loss.
    """
    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for a, b in _row_blocks(N, V, logits.element_size(), logits.device.type):
        z, y, st = logits[a:b], labels[a:b], stats[a:b]
        t = _transform(z, opts)
        _, col, inside = _label_logit(t, y, opts)
        valid = y != opts.ignore_index
        ty = st[:, S_TY, None]
        g = torch.sub(t, st[:, S_M, None]).mul_(1.0 / opts.beta).sub_(st[:, S_LOGS0, None]).exp_()
        if opts.logsigmoid:
            g.mul_(torch.sub(t, ty).mul_(1.0 / LOGSIGMOID_TEMPERATURE).sigmoid_())
        g.scatter_add_(1, col[:, None], torch.where(inside, -st[:, S_YCOEF], 0.0)[:, None])
        if opts.z_loss_scale:
            lse = st[:, S_LSE, None]
            g.add_(torch.sub(t, lse).exp_().mul_(2.0 * opts.z_loss_scale * lse))
        _chain(g, t, opts)
        g.mul_(grad_loss[a:b].to(g.dtype)[:, None])
        # Ignored rows have zero statistics, so their terms above may be inf; overwrite, never multiply.
        g.masked_fill_(~valid[:, None], 0.0)
        out[a:b].copy_(g)
    return out
