"""The one adapter from :class:`GEMOptions` to the kernels' scalar arguments and constexprs.

Every launcher in this package takes the call's GEMOptions and asks :func:`kernel_args` for what its
kernel receives, so a new option reaches the kernels through this one function.
"""

from __future__ import annotations

from typing import NamedTuple

from ..options import GEMOptions


class KernelArgs(NamedTuple):
    vocab_start: int  # global id of the logits' first column
    ignore_index: int
    inv_beta: float  # 1 / beta: the kernels multiply
    z_loss_scale: float
    logit_scale: float
    softcap: float  # the softcap, or 1.0 when there is none (SOFTCAP off: never used)
    LOGSIGMOID: bool  # h == "logsigmoid"
    Z_LOSS: bool  # z_loss_scale != 0
    SCALE: bool  # logit_scale != 1 without a softcap (the softcap transform applies the scale itself)
    SOFTCAP: bool
    NEED_LSE: bool  # the plain log-sum-exp sum is needed (CE value, z-loss, metrics)
    METRICS: bool  # return_metrics: two more partials columns (options.P_SENT, P_AMAX)


def kernel_args(opts: GEMOptions) -> KernelArgs:
    softcap = opts.softcap is not None
    return KernelArgs(
        vocab_start=opts.vocab_start,
        ignore_index=opts.ignore_index,
        inv_beta=1.0 / opts.beta,
        z_loss_scale=opts.z_loss_scale,
        logit_scale=opts.logit_scale,
        softcap=opts.softcap if softcap else 1.0,
        LOGSIGMOID=opts.logsigmoid,
        Z_LOSS=opts.z_loss_scale != 0.0,
        SCALE=opts.logit_scale != 1.0 and not softcap,
        SOFTCAP=softcap,
        NEED_LSE=opts.need_lse,
        METRICS=opts.return_metrics,
    )
