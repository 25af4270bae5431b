"""Functional API: argument validation, implementation choice and reduction."""
from .gem import gem_loss

__all__ = ["gem_loss"]
