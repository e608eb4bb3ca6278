"""Rank rules: the uniform formula, rounding, break-even, and explicit rank files."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import SwiftSVDError


def break_even(m: int, n: int) -> int:
    """Largest k whose factors (k·(m+n) parameters) still save over the dense m·n."""
    return (m * n - 1) // (m + n)


def uniform_rank(m: int, n: int, ratio: float, multiple: int = 1) -> int | None:
    """k = floor((1−r)·m·n/(m+n)), rounded to the nearest ``multiple`` (down on a tie, and down
    when up would reach break-even), so the achieved ratio stays near the requested one instead
    of always overshooting it; None when dense is no larger."""
    k = math.floor((1.0 - ratio) * m * n / (m + n))
    if multiple > 1:
        down = (k // multiple) * multiple
        up = down + multiple
        k = max(multiple, up if 2 * (k - down) > multiple and up <= break_even(m, n) else down)
    k = max(k, 1)
    return k if k <= break_even(m, n) else None


def check_ratio(ratio: float) -> float:
    if not (0.0 < ratio < 1.0):
        raise SwiftSVDError(f"--ratio must be in (0, 1), got {ratio}")
    return ratio


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float, multiple: int = 1) -> dict[str, int]:
    """Ranks for every linear that gains from factorization at ``ratio`` (others stay dense)."""
    check_ratio(ratio)
    ranks = {}
    for name, (m, n) in shapes.items():
        k = uniform_rank(m, n, ratio, multiple)
        if k is not None:
            ranks[name] = k
    return ranks


def read_ranks_file(path: str | Path, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Explicit per-linear ranks from JSON ``{module_name: k}``; k ≥ break-even means stay dense."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise SwiftSVDError(f"ranks file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SwiftSVDError(f"ranks file {path}: invalid JSON ({e.msg})") from None
    if isinstance(raw, dict) and isinstance(raw.get("ranks"), dict):
        raw = raw["ranks"]  # also accept a manifest.json
    if not isinstance(raw, dict):
        raise SwiftSVDError(f"ranks file {path}: expected an object {{module_name: rank}}")
    ranks = {}
    for name, k in raw.items():
        if name not in shapes:
            raise SwiftSVDError(f"ranks file {path}: {name!r} is not a compressible linear of this model")
        m, n = shapes[name]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(m, n):
            raise SwiftSVDError(f"ranks file {path}: rank {k!r} for {name} is out of range [1, {min(m, n)}]")
        if k <= break_even(m, n):
            ranks[name] = k
    return ranks


def param_count(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> tuple[int, int]:
    """(dense parameters, parameters after factorization) over the compressible linears."""
    dense = sum(m * n for m, n in shapes.values())
    after = sum(ranks[name] * (m + n) if name in ranks else m * n for name, (m, n) in shapes.items())
    return dense, after
