"""The GEM kernels of each implementation, as the autograd Functions call them.

Both implementations have the same shape of call (``ops`` / ``torch_ops``), so a Function picks one
by ``opts.impl`` ("triton" or "torch", resolved by the functional layer) and hands it on.
"""

from __future__ import annotations

import torch

from ..options import GEMOptions
from ..torch_ops import gem_grad_row_blocks, gem_partials


def triton_available() -> bool:
    """Whether the triton package imports (any failure, not only ImportError, counts as absent: a
    broken install must fall back to the torch path, not crash the call)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_ops():
    """``gem_kernels.ops``, imported at call time: it needs triton, which the torch path does not."""
    from .. import ops

    return ops


def partials_fn(opts: GEMOptions):
    """``f(logits [N, V], labels [N], opts, label_logits=None) -> partials [N, opts.num_partials]``
    of ``opts.impl``: ``ops.gem_forward`` or ``torch_ops.gem_partials``."""
    return triton_ops().gem_forward if opts.impl == "triton" else gem_partials


def grad_into(logits, labels, stats, row_grad, opts: GEMOptions, out) -> torch.Tensor:
    """d(sum_i row_grad_i * loss_i)/d logits from the row statistics, written into ``out`` (which may
    be ``logits``) by the backward of ``opts.impl``. Returns ``out``."""
    if opts.impl == "triton":
        return triton_ops().gem_backward(logits, labels, stats, row_grad.float(), opts, out)
    return gem_grad_row_blocks(logits, labels, stats, row_grad, opts, out=out)
