"""swiftsvd-export: Swift-SVD low-rank compression and export to on-device runtimes."""
from .lowrank import LowRankLinear, load

__version__ = "0.1.0"
__all__ = ["LowRankLinear", "load", "__version__"]
