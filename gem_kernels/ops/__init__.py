"""Triton kernels and their launchers, nothing else. Importing this package needs triton."""
from .gem_bwd import gem_backward
from .gem_fwd import gem_forward

__all__ = ["gem_backward", "gem_forward"]
