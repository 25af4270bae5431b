"""gem-kernels: the GEM loss (Li et al., ICLR 2025) as cheap as cross-entropy."""

from .functional import fused_linear_gem_loss, gem_loss
from .modules import FusedLinearGEMLoss, GEMLoss

__version__ = "0.1.0"

__all__ = ["FusedLinearGEMLoss", "GEMLoss", "fused_linear_gem_loss", "gem_loss", "__version__"]
