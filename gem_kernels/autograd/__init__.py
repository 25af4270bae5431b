"""torch.autograd.Functions: one per implementation path, and the autocast handling of the fused path."""

from ._paths import triton_available
from .autocast import autocast_linear_inputs, autocast_off
from .fused_linear import FusedLinearGEMFunction
from .gem import GEMTorchFunction, GEMTritonFunction

__all__ = [
    "FusedLinearGEMFunction",
    "GEMTorchFunction",
    "GEMTritonFunction",
    "autocast_linear_inputs",
    "autocast_off",
    "triton_available",
]
