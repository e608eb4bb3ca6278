"""PNG plots for a compressed model: ranks per layer and matrix type, perplexity vs ratio."""
from __future__ import annotations

from pathlib import Path

from .allocation import block_of, matrix_type


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ranks(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], path: str | Path, title: str = "") -> Path:
    """One line per matrix type: rank as a fraction of min(out, in) against the block index
    (dense linears are drawn at 1.0), plus absolute ranks in a second panel."""
    plt = _plt()
    types: dict[str, list[tuple[int, float, int]]] = {}
    for name, (m, n) in shapes.items():
        k = ranks.get(name, min(m, n))
        types.setdefault(matrix_type(name), []).append((block_of(name), k / min(m, n), k))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, pts in sorted(types.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=t)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", ms=3, label=t)
    ax1.set_xlabel("block")
    ax1.set_ylabel("rank / min(out, in)")
    ax2.set_xlabel("block")
    ax2.set_ylabel("rank")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle(title or "ranks per layer and matrix type")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_ppl_vs_ratio(curve: dict, path: str | Path, ylabel: str = "perplexity") -> Path:
    """``curve`` = {"ratios": [...], "uniform": [...], "dynamic": [...], "dense": float, ...}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key in ("uniform", "dynamic", "dynamic+refit"):
        if curve.get(key):
            ax.plot(curve["ratios"], curve[key], marker="o", label=key)
    if curve.get("dense"):
        ax.axhline(curve["dense"], color="gray", ls="--", label=f"dense {curve['dense']:.2f}")
    ax.set_xlabel("compression ratio (fraction of linear parameters removed)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
