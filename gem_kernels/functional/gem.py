"""gem_loss: validation, implementation choice and reduction over the autograd Functions."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch

from ..autograd import GEMTorchFunction, GEMTritonFunction
from ..autograd.compiled import gem_torch_compiled
from ..options import GEMOptions
from ..reference import gem_loss_reference
from ._checks import (
    check_float_tensor,
    check_labels,
    check_metrics_vocab,
    check_num_items,
    check_options,
    check_options_type,
    index_labels,
    resolve_impl,
)
from ._reduce import finish_outputs, reduce_tokens, token_weight
from ._vocab_parallel import resolve_vocab_shard


def apply_gem(
    logits2d: torch.Tensor,
    labels1d: torch.Tensor,
    opts: GEMOptions,
    group=None,
    token_scale: Optional[torch.Tensor] = None,
):
    """The one place a GEM autograd Function is applied: (per-token loss [N], detached per-token extras
    [N, opts.num_extras] or empty; see options.X_*). ``opts.impl`` is resolved ("triton" or "torch").
    The grad mode is passed to the torch Function because inside Function.forward it is always off;
    ``token_scale`` (0-d fp32 tensor, d reduced loss / d per-token loss; None for reduction="none"
    and under no_grad) lets the Triton path compute the gradient in its forward. Under torch.compile
    the torch path runs as custom operators (autograd/compiled.py); the Triton path's kernels are
    triton_ops, traced as they are, with the split design (statistics forward + 2-D backward): the
    gradient-in-forward Function hands a buffer from forward to backward through its context, which
    is kept out of traced graphs."""
    if opts.impl == "torch":
        if group is None and torch.compiler.is_compiling():
            return gem_torch_compiled(
                logits2d, labels1d, replace(opts, inplace_backward=False), torch.is_grad_enabled()
            )
        return GEMTorchFunction.apply(logits2d, labels1d, opts, group, torch.is_grad_enabled())
    if torch.compiler.is_compiling():
        token_scale = None
    return GEMTritonFunction.apply(logits2d, labels1d, opts, group, token_scale)


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
    return_metrics: bool = False,
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    validate_labels: bool = True,
    impl: str = "auto",
):
    """GEM loss (Li et al., ICLR 2025) of ``logits [..., V]`` against ``labels [...]``.

    Per token with label y and logits z (after ``z <- logit_scale * z`` and, when ``softcap`` is
    set, ``z <- softcap * tanh(z / softcap)``), with q = softmax(z / beta) and weights w held
    constant (w = 1 for ``h="linear"``, ``sigmoid((z - z_y) / 100)`` for ``h="logsigmoid"``)::

        loss = sum_j q_j w_j (z_j - z_y)  [+ z_loss_scale * logsumexp(z)^2]

    The value can be negative (for linear h it is E_q[z] - z_y); its gradient is
    q * w - onehot(y) * sum(q * w), i.e. the CE gradient with a sharper softmax for linear h.
    Losses and logits are in nats (natural-log units), as for cross-entropy.

    Args:
        logits: [..., V] tensor of unnormalised log-probabilities (any number of leading dims, V >= 1),
            float32 / bfloat16 / float16 (float64 only with impl="torch" or "reference"); may require
            grad; any strides. Aligned with ``labels``: no causal shift is done here.
        labels: [...] integer tensor (int64, int32, uint8, ...) with the leading shape of ``logits``,
            on the same device, values in [0, V) or ``ignore_index`` (checked unless validate_labels=False).
        beta: temperature of the constant distribution q = softmax(z / beta), a finite float > 0
            (default 0.7, the authors' setting; smaller = sharper q). beta = 1 with h="linear" gives
            exactly the cross-entropy gradient.
        h: "linear" (w = 1; the authors' Triton kernel supports only this) or "logsigmoid"
            (w_j = sigmoid((z_j - z_y) / 100), the variant the authors' training scripts use).
        ignore_index: int label value of tokens that contribute 0 loss and 0 gradient (default -100;
            any int, also one inside [0, V)).
        reduction: "mean" (sum over valid tokens / their count, or / ``num_items_in_batch``; 0 and a
            zero gradient, never NaN, when no token is valid), "sum", or "none" (per-token losses of
            shape [...], 0 at ignored tokens).
        num_items_in_batch: with reduction="mean" only: divide the summed loss by this count instead
            (Hugging Face gradient accumulation: the target tokens of the whole accumulated batch).
            An int / float >= 0 or a one-element tensor on any device; 0 gives loss 0, not NaN.
        logit_scale: finite float > 0 multiplying the logits first (Cohere-style; default 1.0).
        softcap: None, or a finite float > 0: then ``z <- softcap * tanh(z / softcap)`` (Gemma-2-style
            logit soft-capping, applied after ``logit_scale``). Gradients chain through both transforms.
        z_loss_scale: finite float >= 0; adds ``z_loss_scale * logsumexp(z)^2`` per valid token
            (PaLM-style z-loss; default 0.0 = off, costing nothing).
        return_ce: bool; also return the plain cross-entropy logsumexp(z) - z_y (nats), detached and
            reduced like the loss, for logging. One more running sum in the same pass.
        return_metrics: bool; also return a dict of training statistics of p = softmax(z), computed
            in the same pass (one more running sum and the running arg-max, only when asked), each a
            detached tensor reduced like the loss (float32; float64 for float64 logits): "ce" (as
            return_ce), "entropy" (logsumexp(z) - sum_j p_j z_j, nats) and "token_accuracy" (1.0
            where the label is the arg-max of z, else 0.0; among equal maxima the lowest vocabulary
            index is the arg-max, on every impl and across vocabulary shards). Needs V <= 2^24.
        inplace_backward: bool; write the gradient into the storage of ``logits``, so no second
            [tokens, V] buffer exists. The caller's logits are overwritten: with impl="triton" and a
            "mean"/"sum" loss that needs a gradient (the gradient is computed in the forward, see
            docs/kernels.md) already during this call, otherwise during backward; do not use them
            after the call. It saves memory only when the logits flatten to [N, V] without a copy.
            Not available with impl="reference"; refused for overlapping rows (expanded tensors).
        process_group: vocabulary-parallel (tensor-parallel) torch.distributed group; ``logits`` is
            then this rank's vocabulary shard [..., V_local] (shards may be uneven) and ``labels``
            are replicated on every rank with global vocabulary ids. Every rank gets the same loss
            and the gradient of its own shard. See docs/vocab_parallel.md.
        vocab_start: int >= 0, global id of this shard's first column. By default it is derived from
            the shard sizes in group rank order with one all-gather (which also checks token counts,
            replicated labels and the global label range); given explicitly, that all-gather is
            skipped and labels are checked in the forward's t_y all-reduce instead.
        validate_labels: bool, default True: check that every label lies in [0, V) or equals
            ``ignore_index``. Eager: ValueError naming the first bad label, at the cost of one
            device-to-host read (a sync on GPU). Under torch.compile: a device-side assert kept in
            the graph (RuntimeError on CPU, a device-side assert on CUDA). False skips the check (no
            read, no assert) for callers who validate upstream: an out-of-range label then makes the
            Triton kernels read outside the row (garbage loss or an illegal memory access) and the
            torch path silently treat the label logit as 0. Shape, dtype and device checks always run.
        impl: "triton" (Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1),
            "torch" (PyTorch over row blocks, any device), "reference" (the materialised oracle
            :func:`gem_kernels.reference.gem_loss_reference`) or "auto" (default: triton for CUDA
            tensors or under TRITON_INTERPRET=1, else torch). Under torch.compile, "auto" gives CPU
            tensors "torch" (the Triton interpreter cannot be traced).

    Under torch.compile (fullgraph=True works) the torch path runs as custom operators; there
    ``inplace_backward`` is not applied (the gradient gets its own buffer). See docs/compile.md.

    Returns:
        float32 loss (a scalar for "mean"/"sum", [...] for "none"; float64 for float64 logits);
        ``(loss, ce)`` with ``return_ce``, ``(loss, metrics)`` with ``return_metrics``,
        ``(loss, ce, metrics)`` with both. The gradient reaches ``logits`` in their dtype.

    Raises:
        ValueError: beta, logit_scale or softcap not a finite number > 0; return_metrics with
            V > 2^24; z_loss_scale < 0; an unknown h, reduction or impl; num_items_in_batch < 0, not
            one element, or given with a reduction other than "mean"; logits without a vocabulary
            dimension; labels of another shape or device, or outside [0, V) and not ignore_index; inplace_backward with
            impl="reference" or overlapping rows; impl="triton" on CPU tensors without the interpreter.
        TypeError: logits or labels not tensors, logits not floating point (or float64 with
            impl="triton"), labels not integer, ignore_index not an int, return_ce,
            return_metrics, inplace_backward or validate_labels not a bool.
        RuntimeError: impl="triton" without the triton package. Every check runs before any kernel.
    """
    options = check_options(
        "gem",
        beta=beta,
        h=h,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        z_loss_scale=z_loss_scale,
        return_ce=return_ce,
        return_metrics=return_metrics,
        inplace_backward=inplace_backward,
        validate_labels=validate_labels,
        impl=impl,
    )
    return gem_loss_with_options(
        logits,
        labels,
        options,
        num_items_in_batch=num_items_in_batch,
        process_group=process_group,
        vocab_start=vocab_start,
    )


def gem_loss_with_options(
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: GEMOptions,
    *,
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
    process_group=None,
    vocab_start: Optional[int] = None,
):
    """:func:`gem_loss` with its options already validated and packed: what ``gem_loss``,
    :class:`gem_kernels.GEMLoss` and the trainer integrations run, so that options built once (at
    construction) are not checked again per call.

    Args:
        logits: [..., V] float32 / bfloat16 / float16 (float64 only with impl "torch" / "reference"),
            any strides, may require grad; aligned with ``labels`` (no causal shift).
        labels: [...] integer tensor with the leading shape of ``logits``, on its device, values in
            [0, V) or ``options.ignore_index`` (range checked unless ``options.validate_labels`` is
            False).
        options: a :class:`gem_kernels.options.GEMOptions` made by
            ``check_options("gem", ...)`` (its ``vocab_start`` is ignored: see below; ``chunk_size``
            and ``low_memory`` do not apply to logits). Not checked again here.
        num_items_in_batch: None, or with reduction "mean" the denominator instead of the valid-token
            count: an int / float >= 0 or a one-element tensor on any device (0 gives 0, not NaN).
        process_group: None, or the vocabulary-parallel torch.distributed group (``logits`` is then
            this rank's shard [..., V_local]), as in gem_loss.
        vocab_start: None, or with ``process_group`` the int >= 0 global id of this shard's first
            column (derived with one all-gather when None), as in gem_loss.

    Returns:
        What gem_loss returns: the float32 loss (float64 for float64 logits; a scalar for "mean" /
        "sum", [...] for "none"), or ``(loss, ce)``, ``(loss, metrics)``, ``(loss, ce, metrics)``.

    Raises:
        TypeError: ``options`` not a GEMOptions; logits or labels not tensors, logits not floating
            point (or float64 with impl "triton"), labels not integer.
        ValueError: num_items_in_batch < 0, not one element, or given with a reduction other than
            "mean"; logits without a vocabulary dimension; labels of another shape or device, or out
            of range; return_metrics with V > 2^24; inplace_backward with overlapping rows;
            impl "triton" on CPU tensors without the interpreter (or under torch.compile); invalid
            process_group / vocab_start (see gem_loss).
        RuntimeError: impl "triton" without the triton package. Every check runs before any kernel.
    """
    check_options_type(options)
    opts = options
    ignore_index = opts.ignore_index
    check_num_items(num_items_in_batch, opts.reduction)
    check_float_tensor(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a scalar")
    labels = index_labels(labels)
    V = logits.shape[-1]
    if V < 1 and process_group is None:  # a group checks every shard's size on every rank alike
        raise ValueError("logits must have a vocabulary dimension of size >= 1, got 0")
    shard, offset = None, 0
    if process_group is not None or vocab_start is not None:
        shard, offset, _ = resolve_vocab_shard(
            process_group, vocab_start, logits.shape[:-1], V, logits.device, labels, ignore_index, opts.impl
        )
    else:
        check_labels(labels, "logits", logits.shape[:-1], logits.device, V, ignore_index, opts.validate_labels)
    check_metrics_vocab(opts.return_metrics, offset + V, "logits")
    impl = resolve_impl(opts.impl, logits)
    if impl == "triton" and not logits.is_cuda and torch.compiler.is_compiling():
        raise ValueError(
            "gem_loss(impl='triton') under torch.compile needs CUDA tensors: the Triton "
            "interpreter cannot be traced; use impl='torch' (or 'auto') on CPU"
        )
    if impl == "reference":
        return reference_loss(logits, labels, opts, num_items_in_batch)
    opts = replace(opts, vocab_start=offset, impl=impl)
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1 and V > 1:
        logits2d = logits2d.contiguous()
    if opts.inplace_backward and logits2d.shape[0] > 1 and logits2d.stride(0) < V:
        raise ValueError(
            "inplace_backward=True needs logits whose rows do not overlap in memory (e.g. not an "
            f"expanded tensor); got row stride {logits2d.stride(0)} for V={V}"
        )
    labels1d = labels.reshape(-1).contiguous()  # the kernels index labels with unit stride
    valid = labels1d != ignore_index
    reduction = opts.reduction
    token_scale = token_weight(reduction, valid, num_items_in_batch) if torch.is_grad_enabled() else None
    per_token, extras = apply_gem(logits2d, labels1d, opts, shard, token_scale)
    loss = reduce_tokens(per_token, valid, reduction, num_items_in_batch, labels.shape)
    return finish_outputs(
        loss, extras, valid, reduction, num_items_in_batch, labels.shape, opts.return_ce, opts.return_metrics
    )


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, opts: GEMOptions, num_items_in_batch):
    """impl="reference": :func:`gem_kernels.reference.gem_loss_reference` with the call's options
    (shared by both public paths; the fused one passes the materialised logits)."""
    return gem_loss_reference(
        logits,
        labels,
        beta=opts.beta,
        h=opts.h,
        ignore_index=opts.ignore_index,
        reduction=opts.reduction,
        num_items_in_batch=num_items_in_batch,
        logit_scale=opts.logit_scale,
        softcap=opts.softcap,
        z_loss_scale=opts.z_loss_scale,
        return_ce=opts.return_ce,
        return_metrics=opts.return_metrics,
    )
