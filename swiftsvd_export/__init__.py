"""swiftsvd-export: Swift-SVD low-rank compression and export to on-device runtimes."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LowRankLinear", "load", "__version__"]


def __getattr__(name: str):
    # Lazy, so that runtime-only paths (the onnxruntime generation loop) do not import torch.
    if name in ("LowRankLinear", "load"):
        from . import lowrank

        return getattr(lowrank, name)
    raise AttributeError(name)
