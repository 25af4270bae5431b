"""Non-tensor options of a GEM call, carried as one frozen dataclass.

This module is a leaf: every layer (kernels, torch path, autograd, functional API) reads it,
and it imports nothing from the package.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
# With return_metrics two more columns follow (partials [N, NUM_PARTIALS_METRICS]):
# sent = sum exp(t_j - m) (t_j - m) (<= 0; the entropy is log(sce) - sent / sce, a sum of two
# non-negative terms, so nothing cancels), and amax = local column of the first (lowest) index
# where t reaches its maximum m (-1 when none), an exact integer in the float column: the
# functional layer refuses return_metrics for a vocabulary (shard) of 2^24 columns or more.
P_SENT, P_AMAX = 6, 7
NUM_PARTIALS_METRICS = 8
MAX_METRICS_VOCAB = 1 << 24

# Columns of the detached per-token extras a forward returns beside the loss ([N, num_extras]):
# ce alone with return_ce; ce, entropy and token accuracy with return_metrics.
X_CE, X_ENTROPY, X_ACC = range(3)
METRIC_NAMES = ("ce", "entropy", "token_accuracy")

# Columns of the per-row statistics the backward pass reads (see torch_ops.stats.finalize).
# m, log(s0), y_coef = s1 / s0, t_y, lse(t). Ignored rows hold zeros.
S_M, S_LOGS0, S_YCOEF, S_TY, S_LSE = range(5)
NUM_STATS = 5


@dataclass(frozen=True)
class GEMOptions:
    """Everything about a GEM call that is not a tensor, validated once by
    ``gem_kernels.functional.check_options`` and carried unchanged down to the kernels.

    The fields are the keyword options of ``gem_loss`` / ``fused_linear_gem_loss`` (see there for
    their meaning), except two that the functional layer resolves per call (``dataclasses.replace``)
    before the options go down: ``vocab_start``, the global vocabulary id of this tensor's first
    column (non-zero only for a vocabulary shard under tensor parallelism), and ``impl``, which is
    "auto" as an option and the implementation that runs ("triton" or "torch") below the
    functional layer. ``inplace_backward`` belongs to the logits path only, ``chunk_size`` and
    ``low_memory`` to the fused lm_head path only (:data:`GEM_ONLY`, :data:`FUSED_ONLY`).
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
    return_metrics: bool = False
    reduction: str = "mean"
    impl: str = "auto"
    validate_labels: bool = True
    chunk_size: Optional[int] = None
    low_memory: bool = False

    @property
    def need_lse(self) -> bool:
        """True when the plain log-sum-exp of the logits is needed (CE value or z-loss)."""
        return self.return_ce or self.return_metrics or self.z_loss_scale != 0.0

    @property
    def num_partials(self) -> int:
        return NUM_PARTIALS_METRICS if self.return_metrics else NUM_PARTIALS

    @property
    def num_extras(self) -> int:
        """Columns of the per-token extras: 3 with return_metrics, 1 with return_ce only, else 0."""
        return 3 if self.return_metrics else (1 if self.return_ce else 0)

    @property
    def logsigmoid(self) -> bool:
        return self.h == "logsigmoid"


# Which fields are options of which public function ("gem": gem_loss / GEMLoss, "fused":
# fused_linear_gem_loss / FusedLinearGEMLoss). vocab_start is per call (with process_group), not an option.
GEM_ONLY = ("inplace_backward",)
FUSED_ONLY = ("chunk_size", "low_memory")
OPTION_DEFAULTS = {f.name: f.default for f in fields(GEMOptions) if f.name != "vocab_start"}
OPTION_NAMES = {
    "gem": tuple(n for n in OPTION_DEFAULTS if n not in FUSED_ONLY),
    "fused": tuple(n for n in OPTION_DEFAULTS if n not in GEM_ONLY),
}
