"""gem_loss: validation, implementation choice and reduction over the autograd Functions."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..autograd import GEMTorchFunction, GEMTritonFunction
from ..options import GEMOptions
from ..reference import gem_loss_reference
from ._checks import check_float_tensor, check_labels, check_options, index_labels, resolve_impl
from ._reduce import reduce_tokens
from ._vocab_parallel import resolve_vocab_shard

_FUNCTIONS = {"triton": GEMTritonFunction, "torch": GEMTorchFunction}


def apply_gem(logits2d: torch.Tensor, labels1d: torch.Tensor, opts: GEMOptions, impl: str, group=None):
    """The one place a GEM autograd Function is applied: (per-token loss [N], per-token CE [N] or empty).
    The grad mode is passed in because inside Function.forward it is always off."""
    return _FUNCTIONS[impl].apply(logits2d, labels1d, opts, group, torch.is_grad_enabled())


def gem_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.7,
    h: str = "linear",
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    z_loss_scale: float = 0.0,
    return_ce: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    impl: str = "auto",
):
    """GEM loss (Li et al., ICLR 2025) of ``logits [..., V]`` against ``labels [...]``.

    Per token with label y and logits z (after ``z <- logit_scale * z`` and, when ``softcap`` is
    set, ``z <- softcap * tanh(z / softcap)``), with q = softmax(z / beta) and weights w held
    constant (w = 1 for ``h="linear"``, ``sigmoid((z - z_y) / 100)`` for ``h="logsigmoid"``)::

        loss = sum_j q_j w_j (z_j - z_y)  [+ z_loss_scale * logsumexp(z)^2]

    The value can be negative (for linear h it is E_q[z] - z_y); its gradient is
    q * w - onehot(y) * sum(q * w), i.e. the CE gradient with a sharper softmax for linear h.

    Args:
        logits: [..., V] float32 / bfloat16 / float16 (float64 with impl="torch"/"reference").
            Labels are aligned with the logits: no causal shift is done here.
        labels: [...] integer, values in [0, V) or ``ignore_index``.
        reduction: "mean" (over valid tokens, or divided by ``num_items_in_batch``), "sum" or
            "none" (per-token losses of shape [...], 0 at ignored tokens).
        return_ce: also return the plain cross-entropy logsumexp(z) - z_y, detached and reduced
            like the loss, for logging.
        inplace_backward: write the gradient into the storage of ``logits`` during backward, so no
            second [tokens, V] buffer exists. The caller's logits are overwritten.
        process_group: vocabulary-parallel (tensor-parallel) torch.distributed group; ``logits`` is
            then this rank's vocabulary shard [..., V_local] (shards may be uneven) and ``labels``
            are replicated on every rank with global vocabulary ids. Every rank gets the same loss
            and the gradient of its own shard. See docs/vocab_parallel.md.
        vocab_start: global id of this shard's first column. By default it is derived from the
            shard sizes in group rank order with one all-gather (which also checks token counts,
            replicated labels and the global label range); given explicitly, that all-gather is
            skipped and labels are checked in the forward's t_y all-reduce instead.
        impl: "triton", "torch" (chunked PyTorch), "reference" (materialised oracle) or "auto"
            (triton for CUDA tensors or under TRITON_INTERPRET=1, else torch).

    Returns:
        float32 loss (a scalar for "mean"/"sum"), or ``(loss, ce)`` when ``return_ce``.
    """
    check_options(beta=beta, h=h, ignore_index=ignore_index, reduction=reduction,
                  num_items_in_batch=num_items_in_batch, logit_scale=logit_scale, softcap=softcap,
                  z_loss_scale=z_loss_scale, return_ce=return_ce, impl=impl, inplace_backward=inplace_backward)
    check_float_tensor(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a scalar")
    labels = index_labels(labels)
    V = logits.shape[-1]
    if V < 1 and process_group is None:  # a group checks every shard's size on every rank alike
        raise ValueError("logits must have a vocabulary dimension of size >= 1, got 0")
    shard, offset = None, 0
    if process_group is not None or vocab_start is not None:
        shard, offset, _ = resolve_vocab_shard(process_group, vocab_start, logits.shape[:-1], V, logits.device,
                                               labels, ignore_index, impl)
    else:
        check_labels(labels, "logits", logits.shape[:-1], logits.device, V, ignore_index)
    impl = resolve_impl(impl, logits)
    if impl == "reference":
        return gem_loss_reference(logits, labels, beta=beta, h=h, ignore_index=ignore_index,
                                  reduction=reduction, num_items_in_batch=num_items_in_batch,
                                  logit_scale=logit_scale, softcap=softcap, z_loss_scale=z_loss_scale,
                                  return_ce=return_ce)
    opts = GEMOptions(beta=float(beta), h=h, ignore_index=int(ignore_index), logit_scale=float(logit_scale),
                      softcap=None if softcap is None else float(softcap), z_loss_scale=float(z_loss_scale),
                      return_ce=return_ce, inplace_backward=inplace_backward, vocab_start=offset)
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1 and V > 1:
        logits2d = logits2d.contiguous()
    if inplace_backward and logits2d.shape[0] > 1 and logits2d.stride(0) < V:
        raise ValueError("inplace_backward=True needs logits whose rows do not overlap in memory (e.g. not an "
                         f"expanded tensor); got row stride {logits2d.stride(0)} for V={V}")
    labels1d = labels.reshape(-1).contiguous()  # the kernels index labels with unit stride
    valid = labels1d != ignore_index
    per_token, per_token_ce = apply_gem(logits2d, labels1d, opts, impl, shard)
    loss = reduce_tokens(per_token, valid, reduction, num_items_in_batch, labels.shape)
    if return_ce:
        return loss, reduce_tokens(per_token_ce, valid, reduction, num_items_in_batch, labels.shape)
    return loss
