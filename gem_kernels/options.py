"""Non-tensor options of a GEM call, carried as one frozen dataclass.

This module is a leaf: every layer (kernels, torch path, autograd, functional API) reads it,
and it imports nothing from the package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

H_CHOICES = ("linear", "logsigmoid")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "triton", "torch", "reference")

# The logsigmoid weight is sigmoid((z_j - z_y) / LOGSIGMOID_TEMPERATURE), as in the GEM paper.
LOGSIGMOID_TEMPERATURE = 100.0

# Columns of the per-row partial sums written by a forward pass over (a shard of) a row.
# m: running max of the transformed logits t; s0 = sum e_j; s1 = sum e_j w_j;
# s2 = sum e_j w_j (t_j - t_y); sce = sum exp(t_j - m); ty = t_y (0 when the label is elsewhere).
# with e_j = exp((t_j - m) / beta).
P_M, P_S0, P_S1, P_S2, P_SCE, P_TY = range(6)
NUM_PARTIALS = 6

# Columns of the per-row statistics the backward pass reads (see torch_ops.stats.finalize).
# m, log(s0), y_coef = s1 / s0, t_y, lse(t). Ignored rows hold zeros.
S_M, S_LOGS0, S_YCOEF, S_TY, S_LSE = range(5)
NUM_STATS = 5


@dataclass(frozen=True)
class GEMOptions:
    """Everything about a GEM call that is not a tensor.

    ``vocab_start`` is the global vocabulary id of this tensor's first column (non-zero only for
    a vocabulary shard under tensor parallelism).
    """

    beta: float = 0.7
    h: str = "linear"
    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    z_loss_scale: float = 0.0
    return_ce: bool = False
    inplace_backward: bool = False
    vocab_start: int = 0

    @property
    def need_lse(self) -> bool:
        """True when the plain log-sum-exp of the logits is needed (CE value or z-loss)."""
        return self.return_ce or self.z_loss_scale != 0.0

    @property
    def logsigmoid(self) -> bool:
        return self.h == "logsigmoid"
