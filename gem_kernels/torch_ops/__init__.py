"""Pure-PyTorch building blocks: the GEM path over row blocks and the O(tokens) statistics shared by all paths."""

from .gem import gem_forward_row_blocks, gem_grad_row_blocks, gem_partials, label_columns
from .stats import finalize

__all__ = ["finalize", "gem_forward_row_blocks", "gem_grad_row_blocks", "gem_partials", "label_columns"]
