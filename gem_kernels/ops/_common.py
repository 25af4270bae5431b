"""@triton.jit helpers shared by the GEM kernels, the constants they share with the rest of the
package, and the autotuning wrapper of the row kernels."""

import os

import triton
import triton.language as tl

from .. import options as _options
from .config import row_block

# options.py's constants as Triton constexprs (a @triton.jit function reads a module-level global only
# when it is a tl.constexpr): the partials' and statistics' columns, and the logsigmoid weight's 1/100.
P_M = tl.constexpr(_options.P_M)
P_S0 = tl.constexpr(_options.P_S0)
P_S1 = tl.constexpr(_options.P_S1)
P_S2 = tl.constexpr(_options.P_S2)
P_SCE = tl.constexpr(_options.P_SCE)
P_TY = tl.constexpr(_options.P_TY)
P_SENT = tl.constexpr(_options.P_SENT)
P_AMAX = tl.constexpr(_options.P_AMAX)
S_M = tl.constexpr(_options.S_M)
S_LOGS0 = tl.constexpr(_options.S_LOGS0)
S_YCOEF = tl.constexpr(_options.S_YCOEF)
S_TY = tl.constexpr(_options.S_TY)
S_LSE = tl.constexpr(_options.S_LSE)
INV_LOGSIGMOID_TEMPERATURE = tl.constexpr(1.0 / _options.LOGSIGMOID_TEMPERATURE)


def row_autotune(configs, restore_value=None):
    """``triton.autotune`` of a row kernel (parameters ``logits_ptr``, ``V``, constexprs ``BLOCK_V``
    and ``LANES``) over the ops/config.py candidates ``configs``, keyed on V, h and METRICS (the autotuner
    adds the tensor dtypes to the key). Candidates are pruned to the logits' element size and to blocks no
    larger than the row (a smaller block is derived for short rows, and with METRICS, see
    config.row_block); under the Triton interpreter
    only the first one runs, since there is nothing to time."""
    tconfigs = [
        triton.Config(
            {"BLOCK_V": c.block_v, "LANES": c.lanes},
            num_warps=c.num_warps,
            num_stages=c.num_stages,
            maxnreg=c.maxnreg or None,
        )
        for c in configs
    ]
    launch = {id(t): c for t, c in zip(tconfigs, configs)}

    def prune(candidates, named_args, **kwargs):
        element_size = named_args["logits_ptr"].element_size()
        cap = max(16, triton.next_power_of_2(int(named_args["V"])))
        out, seen = [], set()
        for c in candidates:
            cfg = launch.get(id(c))
            if cfg is not None and cfg.element_size != element_size:
                continue
            block = min(row_block(cfg, bool(kwargs.get("METRICS"))) if cfg is not None else c.kwargs["BLOCK_V"], cap)
            if block != c.kwargs["BLOCK_V"]:
                c = triton.Config(
                    {"BLOCK_V": block, "LANES": min(c.kwargs["LANES"], block)},
                    num_warps=c.num_warps,
                    num_stages=c.num_stages,
                    maxnreg=c.maxnreg,
                )
            key = (c.kwargs["BLOCK_V"], c.kwargs["LANES"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            out = out[:1]
        return out

    return triton.autotune(
        configs=tconfigs,
        key=["V", "LOGSIGMOID", "METRICS"],
        prune_configs_by={"early_config_prune": prune},
        restore_value=restore_value,
    )


@triton.jit
def fast_sigmoid(x):
    """1 / (1 + exp(-x)) with the full-range approximate division (div.full.f32, at most 2 ulp):
    the IEEE division is a called subroutine in PTX, and in the unrolled loops of the row kernels its
    call frames put a stack frame (local memory) into some variants (gpu_build check)."""
    return tl.fdiv(1.0, 1.0 + tl.exp(-x), ieee_rounding=False)


@triton.jit
def transform_logits(z, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """t = softcap * tanh(logit_scale * z / softcap) (or logit_scale * z), in fp32."""
    if SOFTCAP:
        x = z * (logit_scale / softcap)
        # tanh(x) = 2 sigmoid(2x) - 1 is finite for every x (-1 at x = -inf) but loses relative
        # precision near 0, which a large softcap multiplies back up; there the odd Taylor series
        # (truncation error < 2e-10 relative for |x| < 1/8) is exact to fp32 rounding.
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        z = softcap * tl.where(tl.abs(x) < 0.125, series, 2.0 * fast_sigmoid(2.0 * x) - 1.0)
    elif SCALE:
        z = z * logit_scale
    return z


@triton.jit
def transform_grad(t, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """dt/dz expressed through t."""
    if SOFTCAP:
        r = tl.fdiv(t, softcap, ieee_rounding=False)
        d = logit_scale * (1.0 - r * r)
    elif SCALE:
        d = logit_scale + tl.zeros_like(t)
    else:
        d = 1.0 + tl.zeros_like(t)
    return d


@triton.jit
def row_partials(
    row_ptr,
    V,
    ty,
    inv_beta,
    logit_scale,
    softcap,
    LOGSIGMOID: tl.constexpr,
    NEED_LSE: tl.constexpr,
    METRICS: tl.constexpr,
    SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANES: tl.constexpr,
):
    """One streaming pass over a row of V logits: (m, s0, s1, s2, sce, sent, amax) as in options.P_*
    (sent = sum exp(t - m)(t - m) and amax = the row's first column where t = m, -1 when none, only
    with METRICS, which needs NEED_LSE; amax is local to this row pointer).

    Every forward kernel computes its row statistics here, so a new per-row sum is added in this
    one place. Each step loads BLOCK_V logits as a [BLOCK_V // LANES, LANES] tile and folds it into
    LANES independent online accumulators (running max and sums per lane): the fold runs over the
    tile's first axis, which the compiler keeps inside each thread (LANES is a multiple of the
    threads times the vector width, see ops/config.py), so the loop has no cross-thread reduction and
    no barrier. The lanes are combined once, after the loop. The logits are read exactly once.
    """
    R: tl.constexpr = BLOCK_V // LANES
    tile = tl.arange(0, R)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    m_v = tl.full([LANES], float("-inf"), tl.float32)
    s0_v = tl.zeros([LANES], tl.float32)
    s1_v = tl.zeros([LANES], tl.float32)
    s2_v = tl.zeros([LANES], tl.float32)
    sce_v = tl.zeros([LANES], tl.float32)
    sent_v = tl.zeros([LANES], tl.float32)
    amax_v = tl.full([LANES], -1, tl.int32)
    lane_ids = tl.arange(0, LANES)
    for start in range(0, V, BLOCK_V):
        offs = start + tile
        mask = offs < V
        z = tl.load(row_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        t = transform_logits(z, logit_scale, softcap, SCALE, SOFTCAP)
        t = tl.where(mask, t, float("-inf"))
        if METRICS:
            # The lane's block max and its first row in the tile (ties: lowest index).
            blk_max, blk_arg = tl.max(t, 0, return_indices=True, return_indices_tie_break_left=True)
            # A later block wins only with a strictly larger max: the lane keeps its first maximal column.
            amax_v = tl.where(blk_max > m_v, start + blk_arg * LANES + lane_ids, amax_v)
        else:
            blk_max = tl.max(t, 0)
        m_new = tl.maximum(m_v, blk_max)
        # -inf logits (masked vocabulary, padding lanes) add 0, never NaN from inf - inf or 0 * inf:
        # m_ref is the lane max, or 0 while the lane has seen only -inf (its sums are then still 0).
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp((m_v - m_ref) * inv_beta)
        finite = t > float("-inf")
        e = tl.where(finite, tl.exp((t - m_ref[None, :]) * inv_beta), 0.0)
        diff = tl.where(finite, t - ty, 0.0)
        s0_v = s0_v * alpha + tl.sum(e, 0)
        if LOGSIGMOID:
            ew = e * fast_sigmoid(diff * INV_LOGSIGMOID_TEMPERATURE)
            s1_v = s1_v * alpha + tl.sum(ew, 0)
        else:
            ew = e
        s2_v = s2_v * alpha + tl.sum(ew * diff, 0)
        if NEED_LSE:
            alpha_ce = tl.exp(m_v - m_ref)
            ex = tl.where(finite, tl.exp(t - m_ref[None, :]), 0.0)
            if METRICS:
                # Re-centre the old sum on the new max; sce = 0 (nothing finite yet) adds 0, not -inf * 0.
                shift = tl.where(sce_v > 0.0, m_v - m_ref, 0.0) * sce_v
                sent_v = (sent_v + shift) * alpha_ce + tl.sum(ex * tl.where(finite, t - m_ref[None, :], 0.0), 0)
            sce_v = sce_v * alpha_ce + tl.sum(ex, 0)
        m_v = m_new
    # Combine the lanes: one reduction per statistic per row.
    m = tl.max(m_v, 0)
    m_ref = tl.where(m > float("-inf"), m, 0.0)
    r = tl.exp((m_v - m_ref) * inv_beta)  # 0 for lanes that saw only -inf
    s0 = tl.sum(s0_v * r, 0)
    s2 = tl.sum(s2_v * r, 0)
    if LOGSIGMOID:
        s1 = tl.sum(s1_v * r, 0)
    else:
        s1 = s0
    sce = 0.0
    sent = 0.0
    amax = -1
    if NEED_LSE:
        r_ce = tl.exp(m_v - m_ref)
        sce = tl.sum(sce_v * r_ce, 0)
        if METRICS:
            sent = tl.sum((sent_v + tl.where(sce_v > 0.0, m_v - m_ref, 0.0) * sce_v) * r_ce, 0)
            # The lowest column among the lanes that reach the row max (all -1 when nothing is finite).
            amax = tl.min(tl.where(m_v == m, amax_v, 2147483647), 0)
    return m, s0, s1, s2, sce, sent, amax


@triton.jit
def store_partials(out, m, s0, s1, s2, sce, ty, sent, amax, vocab_start, METRICS: tl.constexpr):
    """Write one row's partials (options.P_*) at ``out``; with METRICS also sent and the global id of
    the row's first maximal column (``amax`` local, -1 when none: an exact integer in fp32, V < 2^24)."""
    tl.store(out + P_M, m)
    tl.store(out + P_S0, s0)
    tl.store(out + P_S1, s1)
    tl.store(out + P_S2, s2)
    tl.store(out + P_SCE, sce)
    tl.store(out + P_TY, ty)
    if METRICS:
        tl.store(out + P_SENT, sent)
        tl.store(out + P_AMAX, tl.where(amax >= 0, amax + vocab_start, -1).to(tl.float32))


@triton.jit
def grad_block(
    t,
    is_label,
    m,
    log_s0,
    y_coef,
    ty,
    lse,
    inv_beta,
    z_loss_scale,
    logit_scale,
    softcap,
    LOGSIGMOID: tl.constexpr,
    Z_LOSS: tl.constexpr,
    SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """d loss / d z of a block of one row from its statistics (before any upstream factor):
    q w - [k == y] y_coef + 2 s lse softmax(t), chained through the logit transforms.
    Shared by the 2-D backward kernel and the gradient-in-forward kernel."""
    g = tl.exp((t - m) * inv_beta - log_s0)
    if LOGSIGMOID:
        g = g * fast_sigmoid((t - ty) * INV_LOGSIGMOID_TEMPERATURE)
    g = tl.where(is_label, g - y_coef, g)
    if Z_LOSS:
        g += (2.0 * z_loss_scale * lse) * tl.exp(t - lse)
    if SCALE or SOFTCAP:
        g = g * transform_grad(t, logit_scale, softcap, SCALE, SOFTCAP)
    return g
