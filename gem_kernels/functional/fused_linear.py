"""fused_linear_gem_loss: GEM over ``hidden @ weight.T + bias`` without materialising the logits."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch

from ..autograd import FusedLinearGEMFunction, autocast_linear_inputs, autocast_off
from ..autograd.compiled_fused import fused_linear_gem_compiled
from ..options import GEMOptions
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
from ._vocab_parallel import resolve_vocab_shard, shard_chunk_rows
from .gem import reference_loss


def apply_fused_linear_gem(hidden2d, weight, bias, labels1d, opts: GEMOptions, token_scale, group=None):
    """The one place FusedLinearGEMFunction is applied: (per-token loss [N], detached per-token extras
    [N, opts.num_extras] or empty; see options.X_*). ``opts`` carries the resolved impl and chunk size.
    Under torch.compile (single device) the same bodies run as custom operators (autograd/compiled_fused.py)."""
    if group is None and torch.compiler.is_compiling():
        return fused_linear_gem_compiled(hidden2d, weight, bias, labels1d, opts, token_scale, torch.is_grad_enabled())
    return FusedLinearGEMFunction.apply(
        hidden2d, weight, bias, labels1d, opts, token_scale, group, torch.is_grad_enabled()
    )


def _check_linear(hidden, weight, bias):
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size H), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H] (the lm_head weight), got shape {tuple(weight.shape)}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {H}, got {tuple(weight.shape)}")
    if V < 1:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1), got 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on the device of hidden ({hidden.device}), got {weight.device}")
    if bias is not None:
        check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) (V = weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on the device of hidden ({hidden.device}), got {bias.device}")
    return H, V


def fused_linear_gem_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
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
    process_group=None,
    vocab_start: Optional[int] = None,
    chunk_size: Optional[int] = None,
    validate_labels: bool = True,
    low_memory: bool = False,
    impl: str = "auto",
):
    """GEM loss of the logits ``hidden @ weight.T + bias`` against ``labels``, computed in chunks of
    valid tokens so that no [tokens, V] tensor ever exists.

    The math and the loss options are those of :func:`gem_kernels.gem_loss` (see there);
    the per-token loss is computed on the logits ``z = hidden @ weight.T + bias`` (nats).

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 only with impl="torch"/"reference"),
            the final hidden states (any leading dims, H >= 1); may require grad; any strides.
        weight: [V, H], the lm_head weight, same dtype and device as ``hidden`` (under
            ``torch.autocast`` both are first cast to the autocast dtype, as ``F.linear`` would). May be
            tied to the input embeddings: its gradient is returned to autograd, which adds it to the others.
        labels: [...] integer tensor with the leading shape of ``hidden``, on its device, values in
            [0, V) or ``ignore_index``; aligned with ``hidden`` (no causal shift here).
        bias: optional [V], same dtype and device.
        beta: temperature of q = softmax(z / beta), a finite float > 0 (default 0.7, the authors').
        h: "linear" (w = 1) or "logsigmoid" (w_j = sigmoid((z_j - z_y) / 100), the authors' training
            setting).
        ignore_index: int label of tokens that contribute 0 loss and 0 gradient and are skipped by
            the matmuls (default -100).
        reduction: "mean" (over valid tokens, or / ``num_items_in_batch``; 0, never NaN, when none is
            valid), "sum" or "none" (per-token losses [...], 0 at ignored tokens).
        num_items_in_batch: with "mean" only: the denominator instead of the valid-token count (an
            int / float >= 0 or a one-element tensor; 0 gives 0, not NaN), as in gem_loss.
        logit_scale: finite float > 0 multiplying the logits first (default 1.0).
        softcap: None or a finite float > 0: ``z <- softcap * tanh(z / softcap)`` after logit_scale.
        z_loss_scale: finite float >= 0: adds ``z_loss_scale * logsumexp(z)^2`` per valid token.
        return_ce: bool; also return the detached plain CE logsumexp(z) - z_y, reduced like the loss.
        return_metrics: bool; as in gem_loss: a dict of detached "ce", "entropy" and
            "token_accuracy" of the logits' distribution, reduced like the loss, from the same
            chunked pass (the vocabulary must have at most 2^24 rows).
        process_group, vocab_start: vocabulary-parallel lm_head, as in gem_loss: ``weight`` [V_local, H]
            (and ``bias`` [V_local]) is this rank's vocabulary shard, ``hidden`` and ``labels`` are
            replicated. The returned hidden gradient is the full one (all-reduced over the group), so
            do not all-reduce it again (e.g. no Megatron copy-to-tensor-parallel region before this
            call). ``chunk_size`` must then be the same on every rank. See docs/vocab_parallel.md.
        chunk_size: valid tokens per chunk (an int >= 1). None: chosen per device by
            ``gem_kernels.chunk_policy.fused_chunk_rows``: on CUDA the fewest chunks whose logits
            cost at most 3/8 of the weight's bytes (about 0.375 x H rows; each chunk re-reads W and
            the fp32 d weight sums), on CPU ``valid_tokens * H / V`` rows rounded up to 16 (a chunk
            of logits costs about what the valid hidden states cost). The chunk count follows the
            valid tokens, so ignored tokens cost nothing.
        low_memory: False (default): d weight / d bias are summed in fp32 over the chunks; for a
            bf16 / fp16 weight that costs one more weight-sized buffer (peak about 2.4 x the
            weight's bytes + grad_hidden on CUDA). True: they are computed afterwards per
            vocabulary slice, each slice over all valid tokens in one matmul (fp32 accumulation
            inside the matmul, one rounding: the same accuracy), with no buffer of the weight's
            size besides the gradient (peak about the weight's bytes + 1.6 x grad_hidden), for 8
            instead of 6 x valid_tokens x H x V matmul FLOPs (10 with the deferred backward).
        validate_labels: bool, default True, as in gem_loss: False skips the label range check (no device-to-host
            read, no device-side assert under torch.compile); an out-of-range label then reads
            outside the logits chunk in the Triton kernels (garbage or an illegal memory access)
            or is silently treated as a label logit of 0 by the torch path.
        impl: "triton" (Triton GEM kernels on each chunk), "torch" (the same chunking in PyTorch),
            "reference" (materialises ``hidden @ weight.T + bias``; for tests), "auto" as gem_loss.

    Gradients for hidden, weight and bias are computed only when required; with a reduced loss they
    are computed during the forward and backward only rescales them (one backward per forward).
    With ``reduction="none"``, and for float16 inputs (whose gradient must include the upstream
    gradient, e.g. a GradScaler factor, before it is rounded), they are computed in backward, which
    recomputes each chunk's logits (8 instead of 6 x valid_tokens x H x V matmul FLOPs).
    Under ``torch.no_grad()`` only the loss is computed. There is no ``inplace_backward`` option
    (the logits never exist).

    Returns:
        float32 loss (scalar for "mean"/"sum", [...] for "none"; float64 for float64 inputs);
        ``(loss, ce)`` with ``return_ce``, ``(loss, metrics)`` with ``return_metrics``,
        ``(loss, ce, metrics)`` with both. Gradients reach hidden, weight and bias in their dtypes.

    Raises:
        ValueError: the option errors of gem_loss (return_metrics with V > 2^24 included); ``weight``
            not [V, H] with H = hidden.shape[-1] or with V = 0; ``bias`` not [V]; weight / bias / labels
            on another device; labels of another shape or out of range; ``chunk_size`` not None or an
            int >= 1.
        TypeError: non-tensor or non-floating inputs, weight / bias of another dtype than hidden,
            non-integer labels, float64 with impl="triton", ``validate_labels`` or ``low_memory`` not a
            bool, or ``inplace_backward`` passed.
        RuntimeError: impl="triton" without the triton package. Every check runs before any matmul.
    """
    options = check_options(
        "fused",
        beta=beta,
        h=h,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        z_loss_scale=z_loss_scale,
        return_ce=return_ce,
        return_metrics=return_metrics,
        chunk_size=chunk_size,
        validate_labels=validate_labels,
        low_memory=low_memory,
        impl=impl,
    )
    return fused_linear_gem_loss_with_options(
        hidden,
        weight,
        labels,
        bias,
        options,
        num_items_in_batch=num_items_in_batch,
        process_group=process_group,
        vocab_start=vocab_start,
    )


def fused_linear_gem_loss_with_options(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor],
    options: GEMOptions,
    *,
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None,
    process_group=None,
    vocab_start: Optional[int] = None,
):
    """:func:`fused_linear_gem_loss` with its options already validated and packed: what
    ``fused_linear_gem_loss``, :class:`gem_kernels.FusedLinearGEMLoss` and the trainer integrations
    run, so that options built once are not checked again per call.

    Args:
        hidden: [..., H] float32 / bfloat16 / float16 (float64 only with impl "torch" / "reference"),
            any strides, may require grad. Under ``torch.autocast`` hidden, weight and bias are first
            cast to the autocast dtype, as ``F.linear`` would.
        weight: [V, H] lm_head weight (or this rank's vocabulary shard [V_local, H]), hidden's dtype
            and device.
        labels: [...] integer tensor with the leading shape of ``hidden``, on its device, values in
            [0, V) or ``options.ignore_index`` (range checked unless ``options.validate_labels`` is False).
        bias: None or [V], hidden's dtype and device.
        options: a :class:`gem_kernels.options.GEMOptions` made by ``check_options("fused", ...)``
            (its ``vocab_start`` is ignored; ``inplace_backward`` does not apply). Not checked again here.
        num_items_in_batch: None, or with reduction "mean" the denominator instead of the valid-token
            count: an int / float >= 0 or a one-element tensor (0 gives 0, not NaN).
        process_group, vocab_start: vocabulary-parallel lm_head, as in fused_linear_gem_loss.

    Returns:
        What fused_linear_gem_loss returns: the float32 loss (float64 for float64 inputs), or
        ``(loss, ce)``, ``(loss, metrics)``, ``(loss, ce, metrics)``.

    Raises:
        TypeError: ``options`` not a GEMOptions; non-tensor or non-floating inputs, weight / bias of
            another dtype than hidden, non-integer labels, float64 with impl "triton".
        ValueError: num_items_in_batch < 0, not one element or given with a reduction other than
            "mean"; ``weight`` not [V, H] with H = hidden.shape[-1] or with V = 0; ``bias`` not [V];
            weight / bias / labels on another device; labels of another shape or out of range;
            return_metrics with V > 2^24; invalid process_group / vocab_start.
        RuntimeError: impl "triton" without the triton package. Every check runs before any matmul.
    """
    check_options_type(options)
    opts = options
    ignore_index, reduction = opts.ignore_index, opts.reduction
    check_num_items(num_items_in_batch, reduction)
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
    H, V = _check_linear(hidden, weight, bias)
    labels = index_labels(labels)
    layout = None
    if process_group is not None or vocab_start is not None:
        layout = resolve_vocab_shard(
            process_group,
            vocab_start,
            hidden.shape[:-1],
            V,
            hidden.device,
            labels,
            ignore_index,
            opts.impl,
            who="fused_linear_gem_loss",
            name="hidden",
        )
    else:
        check_labels(labels, "hidden", hidden.shape[:-1], hidden.device, V, ignore_index, opts.validate_labels)
    check_metrics_vocab(opts.return_metrics, (layout.vocab_start if layout else 0) + V, "weight's rows")
    impl = resolve_impl(opts.impl, hidden)
    if impl == "reference":
        return reference_loss(torch.nn.functional.linear(hidden, weight, bias), labels, opts, num_items_in_batch)
    hidden2d = hidden.reshape(-1, H)
    labels1d = labels.reshape(-1).contiguous()  # the kernels index labels with unit stride
    valid = labels1d != ignore_index
    chunk_size = opts.chunk_size
    if layout is not None and chunk_size is None:  # every rank must cut the same chunks
        chunk_size = shard_chunk_rows(
            layout, int(valid.sum()), H, V, hidden.device.type, hidden.element_size(), opts.low_memory
        )
    opts = replace(opts, vocab_start=layout.vocab_start if layout else 0, impl=impl, chunk_size=chunk_size)
    # d(reduced loss)/d(per-token loss): lets the Function compute the gradients in the forward. In the
    # loss's dtype, as autograd computes the upstream of a reduced loss, so that backpropagating the
    # loss as is gives a rescaling factor of exactly 1, which the backward skips on the device.
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    token_scale = token_weight(reduction, valid, num_items_in_batch, loss_dtype)
    with autocast_off(hidden.device.type):
        per_token, extras = apply_fused_linear_gem(
            hidden2d, weight, bias, labels1d, opts, token_scale, layout.shard if layout else None
        )
    loss = reduce_tokens(per_token, valid, reduction, num_items_in_batch, labels.shape)
    return finish_outputs(
        loss, extras, valid, reduction, num_items_in_batch, labels.shape, opts.return_ce, opts.return_metrics
    )
