"""Triton kernels and their launchers, nothing else. Importing this package needs triton.

Every GEM launcher takes the call's ``GEMOptions``; ``_args.kernel_args`` is the one adapter from it
to the kernels' scalars and constexprs. ``KERNELS`` lists the kernels for the ahead-of-time build
check (``gem_kernels.gpu_build``).
"""

from . import config
from .gem_bwd import _gem_bwd_kernel, gem_backward
from .gem_fwd import _gem_fwd_kernel, gem_forward
from .gem_fwd_grad import _gem_fwd_grad_kernel, gem_forward_grad
from .gem_scale import _gem_scale_kernel, gem_scale_rows
from .grad_scale import _grad_scale_kernel, scale_grad_

# name -> (the @triton.jit function, its launch configurations from config.py). The autotuned row
# kernels are listed by their jit function (``.fn``): the build compiles every candidate itself.
KERNELS = {
    "gem_fwd": (_gem_fwd_kernel.fn, config.FORWARD_CONFIGS),
    "gem_fwd_grad": (_gem_fwd_grad_kernel.fn, config.FORWARD_GRAD_CONFIGS),
    "gem_bwd": (_gem_bwd_kernel, (config.BACKWARD,)),
    "gem_scale": (_gem_scale_kernel, (config.SCALE,)),
    "grad_scale": (_grad_scale_kernel, (config.GRAD_SCALE,)),
}

__all__ = ["KERNELS", "config", "gem_backward", "gem_forward", "gem_forward_grad", "gem_scale_rows", "scale_grad_"]
