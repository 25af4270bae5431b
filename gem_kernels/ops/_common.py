"""@triton.jit helpers shared by the GEM kernels."""
import triton
import triton.language as tl


@triton.jit
def transform_logits(z, logit_scale, softcap, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """t = softcap * tanh(logit_scale * z / softcap) (or logit_scale * z), in fp32."""
    if SOFTCAP:
        x = z * (logit_scale / softcap)
        # tanh(x) = 2 sigmoid(2x) - 1: finite for every x, -1 at x = -inf.
        z = softcap * (2.0 * tl.sigmoid(2.0 * x) - 1.0)
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
