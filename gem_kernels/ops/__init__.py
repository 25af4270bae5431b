"""Triton kernels and their launchers, nothing else. Importing this package needs triton."""
from .gem_bwd import gem_backward
from .gem_fwd import gem_forward
from .gem_fwd_grad import gem_forward_grad
from .gem_scale import gem_scale_rows
from .grad_scale import scale_grad_

__all__ = ["gem_backward", "gem_forward", "gem_forward_grad", "gem_scale_rows", "scale_grad_"]
