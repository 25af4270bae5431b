"""@triton.jit helpers shared by the GEM kernels."""
import triton
import triton.language as tl


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
        z = softcap * tl.where(tl.abs(x) < 0.125, series, 2.0 * tl.sigmoid(2.0 * x) - 1.0)
    elif SCALE:
        z = z * logit_scale
    return z


@triton.jit
def transform_grad(t, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """dt/dz expressed through t."""
    if SOFTCAP:
        r = t / softcap
        d = logit_scale * (1.0 - r * r)
    elif SCALE:
        d = logit_scale + tl.zeros_like(t)
    else:
        d = 1.0 + tl.zeros_like(t)
    return d
