"""Functional API: argument validation, implementation choice and reduction."""
from .fused_linear import fused_linear_gem_loss
from .gem import gem_loss

__all__ = ["fused_linear_gem_loss", "gem_loss"]
