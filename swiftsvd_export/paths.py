"""Where the tool keeps its caches (outside the repository)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SWIFTSVD_CACHE`` or ``~/.cache/swiftsvd-export``."""
    root = os.environ.get("SWIFTSVD_CACHE") or Path.home() / ".cache" / "swiftsvd-export"
    return Path(root)
