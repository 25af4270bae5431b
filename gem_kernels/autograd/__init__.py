"""torch.autograd.Functions: one per implementation path."""
from .gem import GEMTorchFunction, GEMTritonFunction

__all__ = ["GEMTorchFunction", "GEMTritonFunction"]
