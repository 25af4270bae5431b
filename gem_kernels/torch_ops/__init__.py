"""Pure-PyTorch building blocks: the chunked CPU path and the O(tokens) statistics shared by all paths."""
from .gem import gem_forward_chunked, gem_grad_chunked
from .stats import finalize

__all__ = ["finalize", "gem_forward_chunked", "gem_grad_chunked"]
