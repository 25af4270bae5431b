"""gem-kernels: the GEM loss (Li et al., ICLR 2025) as cheap as cross-entropy."""
from .functional import gem_loss
from .modules import GEMLoss

__version__ = "0.1.0"

__all__ = ["GEMLoss", "gem_loss", "__version__"]
