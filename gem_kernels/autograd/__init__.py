"""torch.autograd.Functions: one per implementation path."""
from .fused_linear import FusedLinearGEMFunction
from .gem import GEMTorchFunction, GEMTritonFunction

__all__ = ["FusedLinearGEMFunction", "GEMTorchFunction", "GEMTritonFunction"]
