"""Plain PyTorch GEM, written straight from the math: the oracle every other path is tested against.

It materialises several [tokens, vocab] tensors and computes in the dtype it is given, so a test can
run it in float64 (the truth) or in the input dtype (what plain PyTorch would get).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .options import LOGSIGMOID_TEMPERATURE


def _transform(z: torch.Tensor, logit_scale: float, softcap: Optional[float]) -> torch.Tensor:
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def gem_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.7,
    h: str = "linear",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss_scale: float = 0.0,
    return_ce: bool = False,
    return_metrics: bool = False,
):
    """GEM loss of ``logits [..., V]`` against ``labels [...]``, fully materialised.

    Per token with label y and transformed logits t (``t = softcap*tanh(logit_scale*z/softcap)``):
    ``q = softmax(t / beta)`` and ``w`` (1, or ``sigmoid((t - t_y)/100)`` for h="logsigmoid") are
    constants; ``loss = sum_j q_j w_j (t_j - t_y) + z_loss_scale * lse(t)^2`` (nats).
    Computes in ``logits.dtype``; returns float32 (float64 for float64 input). With
    ``return_ce`` also returns the detached CE ``lse(t) - t_y`` reduced the same way. Gradients
    come from autograd through the materialised formula (several [..., V] temporaries).

    Args:
        logits: [..., V] floating tensor of any dtype (float64 for a float64 truth), any device.
        labels: [...] integer tensor, same leading shape and device, values in [0, V) or
            ``ignore_index`` (not range-checked here: this is the oracle, not the API).
        beta: temperature of q, float > 0 (not checked here; gem_loss checks it).
        h: "linear" or "logsigmoid".
        ignore_index: int label of tokens with 0 loss and 0 gradient (default -100).
        reduction: "mean" (over valid tokens, 0 when none), "sum" or "none" ([...], 0 at ignored).
        num_items_in_batch: with "mean": the denominator instead of the valid count (int / float /
            one-element tensor; 0 gives 0).
        logit_scale, softcap, z_loss_scale, return_ce: as in :func:`gem_kernels.gem_loss`.
        return_metrics: bool; also return a dict of detached statistics of p = softmax(t), reduced
            the same way, last: "ce", "entropy" (-sum_j p_j log p_j, from the materialised
            distribution; 0 * log 0 terms of -inf logits are 0) and "token_accuracy" (1.0 where the
            first, i.e. lowest, index of the maximal t is the label). The tests' oracle for them.

    Returns:
        ``loss``, ``(loss, ce)``, ``(loss, metrics)`` or ``(loss, ce, metrics)``.

    Raises:
        ValueError: an unknown ``h`` or ``reduction``.
    """
    if h not in ("linear", "logsigmoid"):
        raise ValueError(f"h must be 'linear' or 'logsigmoid', got {h!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()  # a narrow dtype would wrap a negative ignore_index in the comparison
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()

    t = _transform(logits, logit_scale, softcap)
    t_y = torch.gather(t, -1, safe.unsqueeze(-1))  # [..., 1]
    with torch.no_grad():
        q = torch.softmax(t / beta, dim=-1)
        if h == "linear":
            w = torch.ones_like(t)
        else:
            w = torch.sigmoid((t - t_y) / LOGSIGMOID_TEMPERATURE)
    contrib = q * w * (t - t_y)
    # q_j = 0 exactly where t_j = -inf (masked vocabulary): that term is 0, not 0 * inf = NaN.
    per_token = torch.where(q == 0, torch.zeros_like(contrib), contrib).sum(-1)
    lse = torch.logsumexp(t, dim=-1)
    if z_loss_scale:
        per_token = per_token + z_loss_scale * lse * lse
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    per_token = torch.where(valid, per_token, zero).to(out_dtype)
    ce = torch.where(valid, (lse - t_y.squeeze(-1)).detach(), zero).to(out_dtype)

    def reduce(x):
        if reduction == "none":
            return x
        total = x.sum()
        if reduction == "sum":
            return total
        if num_items_in_batch is not None:
            # 0 means every token of the accumulation window is ignored: the sum is 0, so is the loss.
            n = num_items_in_batch
            return total / (torch.where(n == 0, torch.ones_like(n), n) if torch.is_tensor(n) else (n or 1))
        return total / valid.sum().clamp(min=1)

    loss = reduce(per_token)
    out = [loss]
    if return_ce:
        out.append(reduce(ce).detach())
    if return_metrics:
        with torch.no_grad():
            p = torch.softmax(t, dim=-1)
            logp = torch.log_softmax(t, dim=-1)
            # p_j = 0 exactly where t_j = -inf: that term is 0, not 0 * -inf = NaN.
            ent = -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(-1)
            # torch.argmax returns the first maximal index: ties go to the lowest index.
            hit = (torch.argmax(t, dim=-1) == safe).to(ent.dtype)
            metrics = {
                name: reduce(torch.where(valid, x, zero).to(out_dtype)).detach()
                for name, x in (("ce", lse - t_y.squeeze(-1)), ("entropy", ent), ("token_accuracy", hit))
            }
        out.append(metrics)
    return out[0] if len(out) == 1 else tuple(out)
