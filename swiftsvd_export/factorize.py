"""Rank-k factorizations W ≈ B·A of one linear, given its input covariance G = XᵀX.

``swift`` (the default) is the closed-form optimum of ‖XWᵀ − XW'ᵀ‖_F over rank-k W': take
the output covariance C = W·G·Wᵀ, do ONE symmetric eigendecomposition, keep the top-k
eigenvectors U_k, and set B = U_k, A = U_kᵀ·W. The error is exactly the sum of the discarded
eigenvalues. When W is taller than wide (out > in), C has rank ≤ in, and we decompose the
smaller matrix with the same nonzero spectrum instead: with any R such that WᵀW = RᵀR,
Q = W·R⁻¹ has orthonormal columns, C = Q·(R·G·Rᵀ)·Qᵀ, and U_k = W·R⁻¹·V_k for the top
eigenvectors V_k of R·G·Rᵀ. R is the Cholesky factor of WᵀW: a GEMM and an in x in Cholesky,
cheaper than a Householder QR (geqrf, then ormqr to apply Q) of the tall W. It
squares W's condition number, so U_k is checked for orthonormality and the Householder QR
takes over when W is too ill-conditioned (or rank-deficient). Still one eigh, no inverse of G,
fine with a singular G.

``whiten`` is SVD-LLM: Cholesky G = S·Sᵀ (with its eigenvalue-shift jitter when G is not
positive definite), SVD of W·S, factors through S⁻¹. It reaches the same optimum when G is
well conditioned. As in SVD-LLM, the Cholesky and the inverse are always done in float64 (an
inverse amplifies round-off); the SVD runs at the working precision. ``svd`` is plain
truncation of W, blind to the activations.

Working precision: float32 by default in the pipeline. swift's eigh needs no inverse, and its
float32 error is within ~4e-4 relative of the float64 optimum on SmolLM2 (its eigh works on the
squared condition number of C; tools/bench_compress.py reports both).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence, TypeVar

import torch

from .linalg_pool import run_each

METHODS = ("swift", "whiten", "svd")
PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}
T = TypeVar("T")


@dataclass
class Factors:
    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    jitter: float = 0.0  # whiten only: the diagonal shift its Cholesky needed

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def shrink_gram(G: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 − β)·G + β·diag(G): the Gram pulled toward its diagonal (covariance shrinkage with
    Ledoit–Wolf's diagonal target). The factors then lean less on the channel correlations of the
    calibration text and keep its per-channel energies; whether that transfers better to other text
    depends on the model (README, "Covariance shrinkage"). β = 0 returns G itself: the exact
    Swift-SVD objective."""
    if beta == 0:
        return G
    out = G * (1 - beta)
    out.diagonal().copy_(G.diagonal())  # (1 − β)·G_ii + β·G_ii
    return out


def output_covariance(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """C = W·G·Wᵀ = Σ YᵀY for Y = XWᵀ."""
    return W @ G @ W.T


def _gram_cholesky(W: torch.Tensor) -> torch.Tensor | None:
    """Upper R (in x in) with WᵀW = RᵀR at W's precision (the Cholesky itself in float64); None
    when WᵀW is not numerically positive definite (W rank-deficient)."""
    R, info = torch.linalg.cholesky_ex((W.T @ W).to(torch.float64), upper=True)
    return R.to(W.dtype) if int(info) == 0 else None


def _orthonormal(U: torch.Tensor) -> bool:
    """‖UᵀU − I‖_max ≤ √ε: the objective's excess over the optimum is second order in that
    deviation, so ≤ ε relative."""
    dev = (U.T @ U - torch.eye(U.shape[1], dtype=U.dtype, device=U.device)).abs().max()
    return bool(dev <= torch.finfo(U.dtype).eps ** 0.5)


def swift_basis(W: torch.Tensor, G: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues of C = W·G·Wᵀ in descending order, its top-k eigenvectors U_k (out x k)).

    For out > in only the min(out, in) possibly nonzero eigenvalues are returned."""
    out_f, in_f = W.shape
    if out_f <= in_f:
        lam, U = torch.linalg.eigh(output_covariance(W, G))
        return lam.flip(0), U.flip(-1)[:, :k].contiguous()
    R = _gram_cholesky(W)
    if R is not None:
        lam, V = torch.linalg.eigh(R @ G @ R.T)
        U = W @ torch.linalg.solve_triangular(R, V.flip(-1)[:, :k], upper=True)  # Q·V_k
        if _orthonormal(U):
            return lam.flip(0), U
    a, tau = torch.geqrf(W)  # W = Q·R in Householder form
    R = a[:in_f].triu()
    lam, V = torch.linalg.eigh(R @ G @ R.T)
    top = W.new_zeros(out_f, k)
    top[:in_f] = V.flip(-1)[:, :k]
    return lam.flip(0), torch.ormqr(a, tau, top)  # Q·[V_k; 0] = U_k


def output_spectrum(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The eigenvalues of C = W·G·Wᵀ alone (descending), for the baselines' rank allocation."""
    if W.shape[0] <= W.shape[1]:
        return torch.linalg.eigvalsh(output_covariance(W, G)).flip(0)
    R = _gram_cholesky(W)
    if R is None:
        R = torch.linalg.qr(W, mode="r")[1]
    return torch.linalg.eigvalsh(R @ G @ R.T).flip(0)


def swift_factorize(W: torch.Tensor, G: torch.Tensor, k: int) -> Factors:
    _, Uk = swift_basis(W, G, k)
    return Factors(A=Uk.T @ W, B=Uk)


def _cholesky_with_jitter(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SVD-LLM's fallback: if G is not positive definite, shift it by (1e-6 − λ_min)·I."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L, 0.0
    lam_min = torch.linalg.eigvalsh(G)[0].item()
    shift = 1e-6 - lam_min
    L, info = torch.linalg.cholesky_ex(G + shift * torch.eye(G.shape[0], dtype=G.dtype, device=G.device))
    if int(info) != 0:
        raise RuntimeError("Cholesky failed even after the jitter shift")
    return L, shift


class Whitening:
    """S and S⁻¹ (float64) for one input covariance, shared by every linear that reads that input."""

    def __init__(self, G: torch.Tensor):
        G = G.to(torch.float64)
        self.S, self.jitter = _cholesky_with_jitter(G)
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        self.S_inv = torch.linalg.solve_triangular(self.S, eye, upper=False)


def whiten_basis(W: torch.Tensor, wh: Whitening, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of SVD-LLM at rank k, at W's precision."""
    U, s, Vh = torch.linalg.svd(W @ wh.S.to(W.dtype), full_matrices=False)
    root = s[:k].sqrt()
    return (U[:, :k] * root).contiguous(), ((root[:, None] * Vh[:k]) @ wh.S_inv.to(W.dtype)).contiguous()


def svd_basis(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of plain truncated SVD at rank k."""
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    root = s[:k].sqrt()
    return (U[:, :k] * root).contiguous(), (root[:, None] * Vh[:k]).contiguous()


def whiten_factorize(W: torch.Tensor, G: torch.Tensor, k: int, whitening: Whitening | None = None) -> Factors:
    wh = whitening or Whitening(G)
    B, A = whiten_basis(W, wh, k)
    return Factors(A=A, B=B, jitter=wh.jitter)


def svd_factorize(W: torch.Tensor, k: int) -> Factors:
    B, A = svd_basis(W, k)
    return Factors(A=A, B=B)


def _shrunk_whitening(G: torch.Tensor, shrink: float) -> Whitening:
    return Whitening(shrink_gram(G, shrink))


def map_block(groups: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]], method: str, dtype: torch.dtype,
              device: torch.device | str, work: Callable[..., T], shrink: float = 0.0) -> dict[str, T]:
    """``work(name, W, G, Gw, whitening)`` for every linear of one block, side by side on the CPU
    (:mod:`.linalg_pool`). ``groups`` pairs the linears that read one input ({name: W}) with that
    input's Gram G (moved to ``device``); Gw is the Gram the decomposition uses, G shrunk by
    ``shrink`` (:func:`shrink_gram`) at ``dtype``; whiten's Cholesky (of that Gram) is made once per group."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    groups = [(weights, G.to(device)) for weights, G in groups if weights]
    whitenings = (run_each([partial(_shrunk_whitening, G, shrink) for _, G in groups], device)
                  if method == "whiten" else [None] * len(groups))
    tasks, names, sizes = [], [], []
    for (weights, G), wh in zip(groups, whitenings):
        Gw = shrink_gram(G, shrink).to(dtype)  # the shrunk float64 copy is not kept
        for name, W in weights.items():
            tasks.append(partial(work, name, W, G, Gw, wh))
            names.append(name)
            sizes.append(W.numel())
    return dict(zip(names, run_each(tasks, device, sizes)))


def factorize_block(groups: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int]]],
                    method: str = "swift", dtype: torch.dtype = torch.float64) -> dict[str, Factors]:
    """Factorize the linears of one block. Each group is ({name: W}, G, {name: rank}): the linears
    that read the input with Gram G; only those in the ranks are factorized (:func:`map_block`)."""
    rank = {name: k for _, _, ranks in groups for name, k in ranks.items()}

    def work(name: str, W: torch.Tensor, G: torch.Tensor, Gw: torch.Tensor, wh: Whitening | None) -> Factors:
        W = W.to(dtype)
        if method == "swift":
            return swift_factorize(W, Gw, rank[name])
        if method == "whiten":
            return whiten_factorize(W, Gw, rank[name], wh)
        return svd_factorize(W, rank[name])

    return map_block([({n: weights[n] for n in ranks}, G) for weights, G, ranks in groups], method, dtype, "cpu",
                     work)


def reconstruction_error(W: torch.Tensor, W_approx: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
    """(‖XWᵀ − XW'ᵀ‖², ‖XWᵀ‖²) from G = XᵀX, without touching X."""
    G = G.to(torch.float64)
    D = (W.to(torch.float64) - W_approx.to(torch.float64))
    W = W.to(torch.float64)
    return (D @ G * D).sum().item(), (W @ G * W).sum().item()
