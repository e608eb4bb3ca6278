"""Per-linear decompositions (what re-targeting needs) and their on-disk cache.

After the calibration pass, every compressible linear W (out x in) gets a
:class:`LinearSpectrum`: the descending eigenvalues of its output covariance C = W·G·Wᵀ
(for allocation), the factor bases truncated at the break-even rank K (no rank above K is
ever used), and the error curve ``curve[k] = ‖X(W − B_k A_k)ᵀ‖²`` for k = 0..K. Factors at
any rank k ≤ K are then slices: ``B = left[:, :k]`` and ``A = right[:k]`` (for ``swift``,
``right`` is not stored: ``A = left[:, :k]ᵀ·W``, one GEMM). A fresh run and a cache hit both
build factors from these same float64 tensors, so a cache hit is byte-identical.

Cache layout: ``cache_root()/stats/<model-key>/<calib-sha256[:16]>-<method>.safetensors``
(``cache_root()`` is ``$SWIFTSVD_CACHE`` or ``~/.cache/swiftsvd-export``). ``model-key``
hashes the resolved model folder path; the entry's metadata records the model fingerprint
(config.json bytes + size and mtime of each weight file), the calibration hash and shape,
the method, the tool's cache format version, and a SHA-256 of all tensor bytes. An entry
whose metadata does not match (stale) or whose bytes fail the checksum or cannot be parsed
(corrupt) is reported with a warning, ignored and recomputed (then overwritten). For
SmolLM2-135M (30 blocks, 210 linears, float64) an entry is about 0.47 GB.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .factorize import Whitening
from .paths import cache_root
from .ranks import break_even

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass
class LinearSpectrum:
    values: torch.Tensor  # descending eigenvalues of C = W G Wᵀ, float64
    left: torch.Tensor  # (out, K) float64
    right: torch.Tensor | None  # (K, in) float64; None for swift (A = left_kᵀ W)
    curve: torch.Tensor  # (K + 1,) error of the rank-k factors, curve[0] = ‖XWᵀ‖²

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def factors(self, W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) at rank k, float64."""
        if k > self.max_rank:
            raise ValueError(f"rank {k} above the stored maximum {self.max_rank}")
        B = self.left[:, :k]
        A = B.T @ W.to(torch.float64) if self.right is None else self.right[:k]
        return A, B

    def error(self, k: int) -> tuple[float, float]:
        return float(self.curve[k]), float(self.curve[0])


@dataclass
class ModelStats:
    spectra: dict[str, LinearSpectrum]
    importance: list[float]
    meta: dict = field(default_factory=dict)
    from_cache: bool = False

    def values(self) -> dict[str, torch.Tensor]:
        return {n: s.values for n, s in self.spectra.items()}


def _tails(values: torch.Tensor, K: int) -> torch.Tensor:
    lam = values.clamp_min(0)
    rev = torch.flip(lam, [0]).cumsum(0)
    tails = torch.cat([torch.flip(rev, [0]), lam.new_zeros(1)])
    return tails[:K + 1].clone()


def _error_curve(W: torch.Tensor, G: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """curve[k] = tr((W − L_k R_k) G (W − L_k R_k)ᵀ) for k = 0..K, without forming W − L_k R_k."""
    K = L.shape[1]
    total = (W @ G * W).sum()
    RG = R @ G
    cross = ((RG @ W.T) * L.T).sum(1)  # (R G Wᵀ L)_ii
    M = (L.T @ L) * (RG @ R.T)
    quad = M.cumsum(0).cumsum(1).diagonal()
    curve = torch.empty(K + 1, dtype=torch.float64)
    curve[0] = total
    curve[1:] = total - 2 * cross.cumsum(0) + quad
    return curve.clamp_min(0)


def decompose_group(weights: dict[str, torch.Tensor], G: torch.Tensor, method: str) -> dict[str, LinearSpectrum]:
    """LinearSpectrum of every linear in ``weights`` (which all read the input with Gram ``G``)."""
    G = G.to(torch.float64)
    whitening = None
    out = {}
    for name, W in weights.items():
        W = W.detach().to(torch.float64)
        m, n = W.shape
        K = max(break_even(m, n), 0)
        if method == "swift":
            if m <= n:
                lam, U = torch.linalg.eigh(W @ G @ W.T)
                left = U.flip(-1)[:, :K].contiguous()
            else:
                Q, R = torch.linalg.qr(W)
                lam, V = torch.linalg.eigh(R @ G @ R.T)
                left = (Q @ V.flip(-1)[:, :K]).contiguous()
            values = lam.flip(0).contiguous()
            out[name] = LinearSpectrum(values, left, None, _tails(values, K))
            continue
        values = torch.linalg.eigvalsh(W @ G @ W.T if m <= n else _small_c(W, G)).flip(0).contiguous()
        if method == "whiten":
            whitening = whitening or Whitening(G)
            U, s, Vh = torch.linalg.svd(W @ whitening.S, full_matrices=False)
            root = s[:K].sqrt()
            left = (U[:, :K] * root).contiguous()
            right = ((root[:, None] * Vh[:K]) @ whitening.S_inv).contiguous()
        elif method == "svd":
            U, s, Vh = torch.linalg.svd(W, full_matrices=False)
            root = s[:K].sqrt()
            left = (U[:, :K] * root).contiguous()
            right = (root[:, None] * Vh[:K]).contiguous()
        else:
            raise ValueError(f"unknown method {method!r}")
        out[name] = LinearSpectrum(values, left, right, _error_curve(W, G, left, right))
    return out


def _small_c(W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    _, R = torch.linalg.qr(W)
    return R @ G @ R.T


# ----------------------------------------------------------------------------- the cache


def model_fingerprint(folder: str | Path) -> str:
    """Cheap identity of a model folder's contents: config.json bytes, weight file sizes and mtimes."""
    folder = Path(folder)
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def entry_path(folder: str | Path, calib_hash: str, method: str) -> Path:
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return cache_root() / "stats" / f"{Path(folder).name}-{key}" / f"{calib_hash[:16]}-{method}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def expected_meta(folder: str | Path, calib: dict, method: str) -> dict:
    return {"cache_format": str(CACHE_FORMAT), "model_fingerprint": model_fingerprint(folder),
            "calib_sha256": calib["token_sha256"], "nsamples": str(calib["nsamples"]),
            "seqlen": str(calib["seqlen"]), "method": method}


def save_stats(path: Path, stats: ModelStats, meta: dict) -> int:
    """Write an entry atomically; returns its size in bytes."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"__importance__": torch.tensor(stats.importance, dtype=torch.float64)}
    for name, s in stats.spectra.items():
        tensors[f"{name}::values"] = s.values
        tensors[f"{name}::left"] = s.left
        tensors[f"{name}::curve"] = s.curve
        if s.right is not None:
            tensors[f"{name}::right"] = s.right
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    md = dict(meta, checksum=_checksum(tensors))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=md)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def load_stats(path: Path, meta: dict) -> tuple[ModelStats | None, str]:
    """(stats, "") on a valid hit; (None, reason) when missing, stale or corrupt."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None, "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        for key, want in meta.items():
            if md.get(key) != want:
                return None, f"stale ({key} changed)"
        tensors = load_file(str(path))
    except Exception as e:  # truncated / garbled header or data
        return None, f"corrupt ({type(e).__name__}: {str(e)[:80]})"
    if _checksum(tensors) != md.get("checksum"):
        return None, "corrupt (checksum mismatch)"
    importance = tensors.pop("__importance__").tolist()
    spectra: dict[str, dict] = {}
    for key, t in tensors.items():
        name, _, part = key.rpartition("::")
        spectra.setdefault(name, {})[part] = t
    try:
        out = {n: LinearSpectrum(d["values"], d["left"], d.get("right"), d["curve"]) for n, d in spectra.items()}
    except KeyError as e:
        return None, f"corrupt (missing tensor {e})"
    return ModelStats(out, importance, md, from_cache=True), ""


def describe_meta(meta: dict) -> str:
    return json.dumps({k: meta[k] for k in sorted(meta) if k != "checksum"})
