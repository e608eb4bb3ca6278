"""Local compressibility, truncation-loss curves and dynamic rank allocation.

Local compressibility
---------------------
For a linear W (out x in) with input covariance G = XᵀX, the output covariance C = W·G·Wᵀ has
eigenvalues λ_1 ≥ λ_2 ≥ … ≥ 0. Swift-SVD keeps the top-k eigenvectors, and its error is the
tail sum ``loss(k) = Σ_{i>k} λ_i`` (exact). The *effective rank* is

    erank(C) = exp(H(p)),  p_i = λ_i / Σ_j λ_j,  H(p) = −Σ p_i log p_i

(Roy & Vetterli): 1 for a one-hot spectrum, n for a flat one.

Dynamic allocation (``--allocation dynamic``): the Swift-SVD paper's rule
-----------------------------------------------------------------------------
As in the authors' code (``dynamic_rank_allocation.py`` of github.com/hiahei/Swift-SVD), the
budget is split by matrix type (q, k, v, o, gate, up, down) exactly as a uniform ratio would
split it, and only *within* a type are ranks moved between blocks:

1. Type budget. P is the parameter budget of the factorizable linears; type t gets
   P_t = P · D_t / D (D_t its dense parameters), so each matrix's uniform-equivalent rank is
   u_j = P_t · (m_j·n_j / D_t) / (m_j + n_j) (= the ``--ratio`` formula for a ratio budget).
2. Base. Every matrix first gets half of it, b_j = ⌊u_j / 2⌋ (rounded down to the multiple).
3. Score. s_j = Ĩ_b^α · log(1 + ε_j)^(1−α), where
   Ĩ_b = (I_b − min I) / (max I − min I + 1e-6) + 1 ∈ [1, 2] is the min-max normalised
   end-to-end importance of the matrix's block, I_b = 1 − mean cos(block input, block output)
   over the calibration tokens, and ε_j = ‖Y_j‖_F = sqrt(Σ_i λ_i) is the output energy of the
   matrix on the calibration set (λ the eigenvalues of its output covariance).
4. Share. The rest of the type budget, P_t − Σ b_j (m_j + n_j), is split in proportion to s_j:
   k_j = b_j + ⌊(P_t − Σ b (m+n)) · s_j / Σ_t s / (m_j + n_j)⌋, rounded down to the multiple
   and capped at the break-even rank.
5. Remainder. What flooring and capping left is handed out one rank step at a time to the
   highest-scoring matrices that can still grow and whose step fits, across all types, so the
   global budget is met to within one rank step of one matrix.

Block importance I_b (``--importance``):

- ``cos``: I_b = 1 − mean cos(block input, block output) over the calibration tokens, a by-product
  of the calibration pass (free);
- ``loss``: I_b = ΔL_b = L(block b alone at the uniform rank) − L(dense), the increase of the mean
  next-token cross-entropy on ``--importance-windows`` calibration windows when only block b's
  linears are replaced by their rank-k factors (k the ``--ratio`` formula's uniform rank at the
  budget's ratio rounded to 0.05), every other block dense (``importance.py``; factors from the
  cached spectra, cached per ratio in the statistics entry). It enters step 3 exactly like the cos
  measure (min-max normalised), so only the ordering and spacing of the blocks change.

The default stays ``cos``: on 16 held-out WikiText-2 train windows (SmolLM2-135M, equal
parameter count) ``loss`` gave 92.9 / 224.8 / 883.3 against cos's 92.8 / 222.2 / 889.7 at
ratios 0.2 / 0.4 / 0.6 (geometric mean +0.5 %, a tie), for ~5 minutes per ratio instead of nothing.

A more important block thus never gets a smaller rank than a less important twin of the same
type and energy. Knob: ``alpha`` in [0, 1] (0 = output energy only, 1 = importance only; the
paper uses 0.6). The default 1.0 was chosen on 16 held-out WikiText-2 train windows (geometric
mean of the held-out perplexity at ratios 0.2/0.4/0.6 on SmolLM2-135M: 0.6 -> 0.8 -> 1.0 kept
improving), never on the test set. Near the minimum budget the bases, raised to ``multiple``,
can overspend; steps are then taken back from the lowest scores first. Ranks stay in
[``multiple``, break-even]. The budget is
``(1 − ratio) · dense linear parameters`` for ``--ratio``, or derived from ``--target-bytes``.
"""
from __future__ import annotations

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


def rank_bounds(m: int, n: int, multiple: int = 1) -> tuple[int, int]:
    """(k_min, k_max) for an m x n matrix: k_min = multiple, k_max = break-even rounded down."""
    be = break_even(m, n)
    kmax = (be // multiple) * multiple if multiple > 1 else be
    kmin = min(multiple, kmax) if kmax >= 1 else 0
    return max(kmin, 1 if kmax >= 1 else 0), kmax


def block_scores(spectra: Mapping[str, torch.Tensor], importance: Sequence[float],
                 alpha: float) -> dict[str, float]:
    """s_j = Ĩ_b^α · log(1 + ‖Y_j‖_F)^(1−α) (step 3 of the module docstring)."""
    imp = [float(x) for x in importance] or [0.0]
    lo, hi = min(imp), max(imp)
    norm = [(x - lo) / (hi - lo + 1e-6) + 1.0 for x in imp]
    out = {}
    for name, lam in spectra.items():
        b = block_of(name)
        energy = math.log1p(math.sqrt(float(torch.as_tensor(lam, dtype=torch.float64).clamp_min(0).sum())))
        out[name] = (norm[b] if b < len(norm) else 1.0) ** alpha * energy ** (1.0 - alpha)
    return out


def _round(k: float, multiple: int) -> int:
    return int(k // multiple) * multiple


def _spend_remainder(ranks: dict[str, int], bounds: Mapping[str, tuple[int, int]],
                     shapes: Mapping[str, tuple[int, int]], order: list[str], remaining: int,
                     multiple: int) -> int:
    """Give rank steps to the highest-scoring matrices that can grow, while a step fits (step 5)."""
    grew = True
    while grew:
        grew = False
        for name in order:
            step = min(multiple, bounds[name][1] - ranks[name])
            cost = step * sum(shapes[name])
            if step > 0 and cost <= remaining:
                ranks[name] += step
                remaining -= cost
                grew = True
    return remaining


def _trim_overspend(ranks: dict[str, int], bounds: Mapping[str, tuple[int, int]],
                    shapes: Mapping[str, tuple[int, int]], order: list[str], remaining: int,
                    multiple: int) -> int:
    """Near the minimum budget the bases (raised to ``multiple``) can overspend: take rank steps
    back from the lowest-scoring matrices until the budget holds (all at k_min always fits)."""
    while remaining < 0:
        for name in order:
            if remaining >= 0:
                break
            step = min(multiple, ranks[name] - bounds[name][0])
            if step > 0:
                ranks[name] -= step
                remaining += step * sum(shapes[name])
    return remaining


def dynamic_ranks(shapes: Mapping[str, tuple[int, int]], spectra: Mapping[str, torch.Tensor],
                  importance: Sequence[float], budget: int, multiple: int = 1,
                  alpha: float = 1.0) -> dict[str, int]:
    """The Swift-SVD allocation (module docstring) of ``budget`` linear parameters.

    ``shapes`` maps every compressible linear to (out, in); ``spectra`` gives the eigenvalues of
    its output covariance; ``importance`` is per block. Linears whose break-even rank is below 1
    stay dense (counted at m·n). Raises SwiftSVDError when even the minimum ranks do not fit.
    """
    bounds = {n: rank_bounds(m, k, multiple) for n, (m, k) in shapes.items()}
    factored = [n for n in shapes if bounds[n][1] >= 1]
    dense_kept = sum(m * n for name, (m, n) in shapes.items() if name not in factored)
    floor_cost = sum(bounds[n][0] * sum(shapes[n]) for n in factored)
    if dense_kept + floor_cost > budget:
        raise SwiftSVDError(f"a budget of {budget:,} linear parameters is below the minimum "
                            f"{dense_kept + floor_cost:,} (every matrix at rank {multiple})")
    scores = block_scores({n: spectra[n] for n in factored}, importance, alpha)
    spend = budget - dense_kept
    total_dense = sum(shapes[n][0] * shapes[n][1] for n in factored)
    types: dict[str, list[str]] = {}
    for name in factored:
        types.setdefault(matrix_type(name), []).append(name)
    ranks: dict[str, int] = {}
    for members in types.values():
        type_dense = sum(shapes[n][0] * shapes[n][1] for n in members)
        share = spend * type_dense / total_dense
        for n in members:
            m, k = shapes[n]
            uniform = share * (m * k / type_dense) / (m + k)
            ranks[n] = min(max(_round(uniform / 2, multiple), bounds[n][0]), bounds[n][1])
        rest = share - sum(ranks[n] * sum(shapes[n]) for n in members)
        total_score = sum(scores[n] for n in members)
        for n in members:
            if rest > 0 and total_score > 0:
                extra = _round(rest * scores[n] / total_score / sum(shapes[n]), multiple)
                ranks[n] = min(ranks[n] + extra, bounds[n][1])
    remaining = spend - sum(ranks[n] * sum(shapes[n]) for n in factored)
    order = sorted(factored, key=lambda n: -scores[n])
    remaining = _trim_overspend(ranks, bounds, shapes, order[::-1], remaining, multiple)
    _spend_remainder(ranks, bounds, shapes, order, remaining, multiple)
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


__all__ = ["effective_rank", "truncation_loss", "dynamic_ranks", "block_scores", "rank_bounds",
           "min_max_linear_params", "uniform_ranks_for_budget", "allocation_summary", "math"]
