"""Rank-k factorizations W ≈ B·A of one linear, given its input covariance G = XᵀX.

``swift`` (the default) is the closed-form optimum of ‖XWᵀ − XW'ᵀ‖_F over rank-k W': take
the output covariance C = W·G·Wᵀ, do ONE symmetric eigendecomposition, keep the top-k
eigenvectors U_k, and set B = U_k, A = U_kᵀ·W. The error is exactly the sum of the discarded
eigenvalues. When W is taller than wide (out > in), C has rank ≤ in, and we decompose the
smaller matrix with the same nonzero spectrum instead: W = Q·R (thin QR, Q orthonormal),
C = Q·(R·G·Rᵀ)·Qᵀ, so the eigenvectors of C are Q times those of R·G·Rᵀ. Still one eigh,
no inverse, no Cholesky, fine with a singular G.

``whiten`` is SVD-LLM: Cholesky G = S·Sᵀ (with its eigenvalue-shift jitter when G is not
positive definite), SVD of W·S, factors through S⁻¹. It reaches the same optimum when G is
well conditioned. ``svd`` is plain truncation of W, blind to the activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("swift", "whiten", "svd")


@dataclass
class Factors:
    A: torch.Tensor  # (k, in)
    B: torch.Tensor  # (out, k)
    jitter: float = 0.0  # whiten only: the diagonal shift its Cholesky needed

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def output_covariance(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """C = W·G·Wᵀ = Σ YᵀY for Y = XWᵀ."""
    return W @ G @ W.T


def swift_factorize(W: torch.Tensor, G: torch.Tensor, k: int) -> Factors:
    out_f, in_f = W.shape
    if out_f <= in_f:
        _, U = torch.linalg.eigh(output_covariance(W, G))
        Uk = U[:, -k:].flip(-1)
    else:
        Q, R = torch.linalg.qr(W)  # W = Q R, Q: out x in with orthonormal columns
        _, V = torch.linalg.eigh(R @ G @ R.T)
        Uk = Q @ V[:, -k:].flip(-1)
    return Factors(A=Uk.T @ W, B=Uk)


def _cholesky_with_jitter(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SVD-LLM's fallback: if G is not positive definite, shift it by (1e-6 − λ_min)·I."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L, 0.0
    lam_min = torch.linalg.eigvalsh(G)[0].item()
    shift = 1e-6 - lam_min
    L, info = torch.linalg.cholesky_ex(G + shift * torch.eye(G.shape[0], dtype=G.dtype))
    if int(info) != 0:
        raise RuntimeError("Cholesky failed even after the jitter shift")
    return L, shift


class Whitening:
    """S and S⁻¹ for one input covariance, shared by every linear that reads that input."""

    def __init__(self, G: torch.Tensor):
        self.S, self.jitter = _cholesky_with_jitter(G)
        eye = torch.eye(G.shape[0], dtype=G.dtype)
        self.S_inv = torch.linalg.solve_triangular(self.S, eye, upper=False)


def whiten_factorize(W: torch.Tensor, G: torch.Tensor, k: int, whitening: Whitening | None = None) -> Factors:
    wh = whitening or Whitening(G)
    U, s, Vh = torch.linalg.svd(W @ wh.S, full_matrices=False)
    root = s[:k].sqrt()
    return Factors(A=(root[:, None] * Vh[:k]) @ wh.S_inv, B=U[:, :k] * root, jitter=wh.jitter)


def svd_factorize(W: torch.Tensor, k: int) -> Factors:
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    root = s[:k].sqrt()
    return Factors(A=root[:, None] * Vh[:k], B=U[:, :k] * root)


def factorize_group(weights: dict[str, torch.Tensor], G: torch.Tensor, ranks: dict[str, int],
                    method: str = "swift", dtype: torch.dtype = torch.float64) -> dict[str, Factors]:
    """Factorize the linears that share input covariance ``G`` (only those present in ``ranks``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    G = G.to(dtype)
    whitening = Whitening(G) if method == "whiten" and ranks else None
    out = {}
    for name, k in ranks.items():
        W = weights[name].to(dtype)
        if method == "swift":
            out[name] = swift_factorize(W, G, k)
        elif method == "whiten":
            out[name] = whiten_factorize(W, G, k, whitening)
        else:
            out[name] = svd_factorize(W, k)
    return out


def reconstruction_error(W: torch.Tensor, W_approx: torch.Tensor, G: torch.Tensor) -> tuple[float, float]:
    """(‖XWᵀ − XW'ᵀ‖², ‖XWᵀ‖²) from G = XᵀX, without touching X."""
    G = G.to(torch.float64)
    D = (W.to(torch.float64) - W_approx.to(torch.float64))
    W = W.to(torch.float64)
    return (D @ G * D).sum().item(), (W @ G * W).sum().item()
