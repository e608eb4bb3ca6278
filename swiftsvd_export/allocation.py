"""Local compressibility, truncation-loss curves and dynamic rank allocation.

Local compressibility
---------------------
For a linear W (out x in) with input covariance G = XᵀX, the output covariance C = W·G·Wᵀ has
eigenvalues λ_1 ≥ λ_2 ≥ … ≥ 0. Swift-SVD keeps the top-k eigenvectors, and its error is the
tail sum ``loss(k) = Σ_{i>k} λ_i`` (exact). The *effective rank* is

    erank(C) = exp(H(p)),  p_i = λ_i / Σ_j λ_j,  H(p) = −Σ p_i log p_i

(Roy & Vetterli): 1 for a one-hot spectrum, n for a flat one.

Dynamic allocation (``--allocation dynamic``)
--------------------------------------------
Given ONE global budget P of parameters for the compressible linears, choose per-matrix
ranks k_j ∈ [k_min, k_max(j)] (k_min = the rounding multiple, k_max = the break-even rank
floor((m·n−1)/(m+n)) rounded down to the multiple) minimising

    Σ_j  w_b(j) · loss_j(k_j) / loss_j(0)      subject to   Σ_j k_j·(m_j + n_j) ≤ P

i.e. the importance-weighted *relative* output energy each matrix loses. ``w_b`` is its block's
end-to-end importance (1 − cos(block input, block output)) raised to ``alpha`` and divided by
the mean over blocks, so w = 1 everywhere when alpha = 0 (purely local allocation).

It is solved by greedy water-filling on marginal gains: every matrix starts at k_min, then
rank steps (of size ``multiple``) go one at a time to the matrix with the largest

    gain_j = w_b(j) · (λ_{k+1} + … + λ_{k+s}) / loss_j(0) / (s · (m_j + n_j))

(weighted, normalised eigenvalue mass recovered per parameter spent) until no further step
fits the budget. Because the eigenvalues are sorted, each matrix's gains are non-increasing,
so greedy is optimal for this separable concave problem, and a matrix in a more important
block never receives fewer parameters than a less important twin with the same spectrum
(ties are broken by weight, then by name order). Steps that do not fit are skipped while
smaller ones still fit, so the budget is met to within one rank step of one matrix.

Knobs: ``alpha`` (importance exponent, default 0.5; 0 = ignore importance), ``per_type`` (split the budget by matrix type first; off) and
``multiple`` (rank rounding). The budget is ``(1 − ratio) · dense linear parameters`` for
``--ratio``, or derived from ``--target-bytes``.
"""
from __future__ import annotations

import heapq
import math
from typing import Iterable, Mapping, Sequence

import torch

from .errors import SwiftSVDError
from .ranks import break_even


def effective_rank(eigenvalues: torch.Tensor | Sequence[float]) -> float:
    """exp(entropy of the normalised non-negative eigenvalues); 0 for an all-zero spectrum."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def truncation_loss(eigenvalues: torch.Tensor, k: int | None = None) -> torch.Tensor | float:
    """Tail sums of descending eigenvalues: loss[k] = Σ_{i>k} λ_i for k = 0..n (or one k)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp_min(0)
    rev = torch.flip(lam, [0]).cumsum(0)
    tails = torch.cat([torch.flip(rev, [0]), lam.new_zeros(1)])
    return tails if k is None else float(tails[min(k, lam.numel())])


def block_of(name: str) -> int:
    """Block index of a module name like ``model.layers.12.mlp.up_proj``."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def importance_weights(importance: Sequence[float], alpha: float = 1.0) -> list[float]:
    """w_b = imp_b^alpha / mean_b(imp^alpha) (all ones when alpha = 0 or importances are all 0)."""
    vals = [max(float(x), 1e-12) ** alpha for x in importance]
    mean = sum(vals) / len(vals) if vals else 1.0
    return [v / mean for v in vals] if mean > 0 else [1.0] * len(vals)


def rank_bounds(m: int, n: int, multiple: int = 1) -> tuple[int, int]:
    """(k_min, k_max) for an m x n matrix: k_min = multiple, k_max = break-even rounded down."""
    be = break_even(m, n)
    kmax = (be // multiple) * multiple if multiple > 1 else be
    kmin = min(multiple, kmax) if kmax >= 1 else 0
    return max(kmin, 1 if kmax >= 1 else 0), kmax


def dynamic_ranks(shapes: Mapping[str, tuple[int, int]], spectra: Mapping[str, torch.Tensor],
                  importance: Sequence[float], budget: int, multiple: int = 1,
                  alpha: float = 0.5, per_type: bool = False) -> dict[str, int]:
    """Greedy water-filling allocation (see the module docstring) for ``budget`` parameters.

    ``shapes`` maps every compressible linear to (out, in); ``spectra`` gives the descending
    eigenvalues of its output covariance. Linears whose break-even rank is below 1 stay
    dense (they are counted at m·n). With ``per_type`` (off by default: it did worse on SmolLM2) the budget is first split
    between matrix types (q, k, v, o, gate, up, down) in proportion to their dense sizes,
    i.e. as a uniform ratio would, and water-filling redistributes ranks across layers
    within each type; a final global pass spends what the per-type passes left over, so the
    global budget is still met to within one rank step. Raises SwiftSVDError when even the
    minimum ranks do not fit.
    """
    weights = importance_weights(importance, alpha) if len(importance) else []
    names = list(shapes)
    order = {name: i for i, name in enumerate(names)}
    ranks: dict[str, int] = {}
    bounds: dict[str, tuple[int, int]] = {}
    used = 0
    for name in names:
        m, n = shapes[name]
        kmin, kmax = rank_bounds(m, n, multiple)
        if kmax < 1:
            used += m * n
            continue
        bounds[name] = (kmin, kmax)
        ranks[name] = kmin
        used += kmin * (m + n)
    if used > budget:
        raise SwiftSVDError(f"a budget of {budget:,} linear parameters is below the minimum {used:,} "
                            f"(every matrix at rank {multiple})")
    tails = {name: truncation_loss(spectra[name]) for name in ranks}

    def weight(name: str) -> float:
        return weights[block_of(name)] if weights else 1.0

    def gain(name: str, k: int) -> float | None:
        kmin, kmax = bounds[name]
        step = min(multiple, kmax - k)
        if step <= 0:
            return None
        t = tails[name]
        total = float(t[0])
        if total <= 0:
            return 0.0
        lo = min(k, t.numel() - 1)
        hi = min(k + step, t.numel() - 1)
        m, n = shapes[name]
        return weight(name) * float(t[lo] - t[hi]) / total / (step * (m + n))

    def fill(members: list[str], remaining: int) -> int:
        heap = []
        for name in members:
            g = gain(name, ranks[name])
            if g is not None:
                heapq.heappush(heap, (-g, -weight(name), order[name], name))
        while heap:
            _, negw, idx, name = heapq.heappop(heap)
            k = ranks[name]
            m, n = shapes[name]
            step = min(multiple, bounds[name][1] - k)
            cost = step * (m + n)
            if cost > remaining:
                continue  # this matrix can no longer grow; smaller ones may still fit
            ranks[name] = k + step
            remaining -= cost
            g = gain(name, k + step)
            if g is not None:
                heapq.heappush(heap, (-g, negw, idx, name))
        return remaining

    remaining = budget - used
    if per_type:
        types: dict[str, list[str]] = {}
        for name in ranks:
            types.setdefault(matrix_type(name), []).append(name)
        dense_factored = sum(shapes[n][0] * shapes[n][1] for n in ranks)
        spend = remaining
        for members in types.values():
            share = sum(shapes[n][0] * shapes[n][1] for n in members) / dense_factored
            floor_cost = sum(ranks[n] * sum(shapes[n]) for n in members)
            type_budget = int(share * (budget - (used - sum(ranks[n] * sum(shapes[n]) for n in ranks))))
            left = fill(members, max(0, min(spend, type_budget - floor_cost)))
            spend -= max(0, min(spend, type_budget - floor_cost)) - left
        remaining = spend
    fill(list(ranks), remaining)
    return ranks


def min_max_linear_params(shapes: Mapping[str, tuple[int, int]], multiple: int = 1) -> tuple[int, int]:
    """(smallest, largest) linear parameter counts the allocator can produce."""
    lo = hi = 0
    for m, n in shapes.values():
        kmin, kmax = rank_bounds(m, n, multiple)
        if kmax < 1:
            lo += m * n
            hi += m * n
        else:
            lo += kmin * (m + n)
            hi += kmax * (m + n)
    return lo, hi


def uniform_ranks_for_budget(shapes: Mapping[str, tuple[int, int]], budget: int,
                             multiple: int = 1) -> tuple[dict[str, int], float]:
    """The uniform-formula ranks at the smallest ratio whose parameter count fits ``budget``."""
    from .ranks import param_count, uniform_ranks

    lo, hi = 1e-6, 1 - 1e-6
    best = None
    for _ in range(60):
        mid = (lo + hi) / 2
        r = uniform_ranks(dict(shapes), mid, multiple)
        if param_count(dict(shapes), r)[1] <= budget:
            best, hi = (r, mid), mid
        else:
            lo = mid
    if best is None:
        raise SwiftSVDError(f"no uniform ratio fits a budget of {budget:,} linear parameters")
    return best


def allocation_summary(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int],
                       spectra: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Per-linear rank, effective rank and relative truncation loss (for manifests and plots)."""
    out = {}
    for name, (m, n) in shapes.items():
        lam = spectra.get(name)
        entry = {"shape": [m, n], "rank": ranks.get(name)}
        if lam is not None:
            t = truncation_loss(lam)
            k = ranks.get(name)
            entry["effective_rank"] = effective_rank(lam)
            entry["relative_loss"] = float(t[min(k, t.numel() - 1)] / t[0]) if k and t[0] > 0 else 0.0
        out[name] = entry
    return out


def matrix_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def iter_blocks(names: Iterable[str]) -> list[int]:
    return sorted({block_of(n) for n in names})


__all__ = ["effective_rank", "truncation_loss", "dynamic_ranks", "importance_weights", "rank_bounds",
           "min_max_linear_params", "uniform_ranks_for_budget", "allocation_summary", "math"]
