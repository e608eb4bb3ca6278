"""Per-linear decompositions (what re-targeting needs), spilled to disk block by block, and their cache.

After the calibration pass, every compressible linear W (out x in) gets a
:class:`LinearSpectrum`: the descending eigenvalues of its output covariance C = W·G·Wᵀ
(for allocation), the factor bases truncated at the break-even rank K (no rank above K is
ever used), and the error curve ``curve[k] = ‖X(W − B_k A_k)ᵀ‖²`` for k = 0..K. Factors at
any rank k ≤ K are then slices: ``B = left[:, :k]`` and ``A = right[:k]`` (for ``swift``,
``right`` is not stored: ``A = left[:, :k]ᵀ·W``, one GEMM).

The bases are the bulk (about half the size of the linears they describe), so they never
stay in RAM: each block's bases go to one safetensors file as soon as the block is
decomposed (:class:`SpectrumStore`), and only eigenvalues and error curves stay in memory;
the factors at the chosen ranks are read back one linear at a time. With the cache on, that
folder becomes the cache entry; with it off, it is a temporary folder under
``cache_root()/tmp`` removed at the end. A fresh run and a cache hit both build factors from
the same stored float32 bases, so a cache hit is byte-identical.

Cache layout: ``cache_root()/stats/<model-key>/<calib-sha256[:16]>-<method>-<precision>[-shrinkβ][-cuda]/``
(``-shrinkβ`` for a shrunk covariance, ``-cuda`` for decompositions made on a GPU)
with ``block-NNNN.safetensors`` files and ``meta.json`` (written last, then the folder is
renamed into place). ``cache_root()`` is ``$SWIFTSVD_CACHE`` or ``~/.cache/swiftsvd-export``;
``model-key`` hashes the resolved model folder path. ``meta.json`` records the model
fingerprint (config.json bytes + size and mtime of each weight file), the calibration hash
and shape, the method, precision and shrinkage, the cache format version, and the SHA-256 of every
block file. An entry whose metadata does not match (stale) or whose files fail the checksum
or cannot be parsed (corrupt) is reported with a warning, ignored and recomputed. For
SmolLM2-135M (30 blocks, 210 linears) an entry is about 0.23 GB.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from .factorize import PRECISIONS, Whitening, map_block, output_spectrum, svd_basis, swift_basis, whiten_basis
from .paths import cache_root
from .ranks import break_even

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
Bases = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass
class LinearSpectrum:
    values: torch.Tensor  # descending eigenvalues of C = W G Wᵀ, float64
    curve: torch.Tensor  # (K + 1,) float64: error of the rank-k factors, curve[0] = ‖XWᵀ‖²
    max_rank: int  # K
    bases: Callable[[], Bases]  # -> left (out, K), right (K, in) or None for swift (A = left_kᵀ W)

    @classmethod
    def in_memory(cls, values: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None,
                  curve: torch.Tensor) -> "LinearSpectrum":
        return cls(values, curve, left.shape[1], lambda: (left, right))

    def factors(self, W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) at rank k, at the stored precision."""
        if k > self.max_rank:
            raise ValueError(f"rank {k} above the stored maximum {self.max_rank}")
        left, right = self.bases()
        B = left[:, :k].contiguous()
        A = B.T @ W.detach().to(B.dtype) if right is None else right[:k].contiguous()
        return A, B

    def error(self, k: int) -> tuple[float, float]:
        return float(self.curve[k]), float(self.curve[0])


@dataclass
class ModelStats:
    spectra: dict[str, LinearSpectrum]
    importance: list[float]
    meta: dict = field(default_factory=dict)
    from_cache: bool = False
    store: "SpectrumStore | None" = None
    importance_at: "Callable[[int], list[float]] | None" = None  # per-budget override (importance.py)

    def values(self) -> dict[str, torch.Tensor]:
        return {n: s.values for n, s in self.spectra.items()}

    def close(self) -> None:
        """Remove the bases' folder if it is temporary (cache off); a cache entry stays."""
        if self.store is not None and self.store.temporary:
            shutil.rmtree(self.store.root, ignore_errors=True)


def _tails(values: torch.Tensor, K: int) -> torch.Tensor:
    lam = values.clamp_min(0)
    rev = torch.flip(lam, [0]).cumsum(0)
    tails = torch.cat([torch.flip(rev, [0]), lam.new_zeros(1)])
    return tails[:K + 1].clone()


def _shrunk_tails(values: torch.Tensor, K: int, W: torch.Tensor, G: torch.Tensor, U: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """swift's error curve on the calibration Gram G when its eigenvectors U (out x K) are those of
    the shrunk C_β = W·((1−β)G + βD)·Wᵀ (eigenvalues ``values``, D = diag(G)). C = (C_β − β·W·D·Wᵀ)/(1−β),
    so with A = UᵀW the error left at rank k, tr(C) − Σ_{i≤k} u_iᵀCu_i, is
    (Σ_{i>k} λ_i − β·Σ_j d_j·(‖W_:,j‖² − Σ_{i≤k} A_ij²)) / (1−β): one GEMM for A, no product with G."""
    d = G.diagonal().to(torch.float64)
    per_row = ((U.T @ W).square() @ d.to(W.dtype)).to(torch.float64).cpu()  # Σ_j d_j A_ij², working precision
    kept = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)])  # Σ_{i≤k}, k = 0..K
    total_d = (W.to(torch.float64).square().sum(0) @ d).cpu()  # Σ_j d_j ‖W_:,j‖²
    return ((_tails(values, K) - beta * (total_d - kept)) / (1 - beta)).clamp_min(0)


def _error_curve(W: torch.Tensor, G: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """curve[k] = tr((W − L_k R_k) G (W − L_k R_k)ᵀ) for k = 0..K, without forming W − L_k R_k."""
    W, G, L, R = (t.to(torch.float64) for t in (W, G, L, R))
    K = L.shape[1]
    total = (W @ G * W).sum()
    RG = R @ G
    cross = ((RG @ W.T) * L.T).sum(1)  # (R G Wᵀ L)_ii
    M = (L.T @ L) * (RG @ R.T)
    quad = M.cumsum(0).cumsum(1).diagonal()
    curve = torch.empty(K + 1, dtype=torch.float64, device=W.device)
    curve[0] = total
    curve[1:] = total - 2 * cross.cumsum(0) + quad
    return curve.clamp_min(0)


def decompose_block(groups: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]], method: str,
                    precision: str = "fp32", device: torch.device | str = "cpu",
                    shrink: float = 0.0) -> dict[str, LinearSpectrum]:
    """LinearSpectrum (in host memory) of every linear of one block. ``groups`` pairs the linears
    that read one input ({name: weight}) with that input's Gram G. The decompositions run on
    ``device``; on the CPU side by side (``factorize.map_block``). With ``shrink`` > 0 they see the
    shrunk Gram (``factorize.shrink_gram``; the eigenvalues are its), while the error curve stays
    the error on the calibration activations themselves."""
    dtype = PRECISIONS[precision]

    def work(_name: str, W: torch.Tensor, G: torch.Tensor, Gw: torch.Tensor,
             whitening: Whitening | None) -> LinearSpectrum:
        W = W.detach().to(device, dtype)
        m, n = W.shape
        K = max(break_even(m, n), 0)
        if method == "swift":
            lam, left = swift_basis(W, Gw, K)
            values = lam.to(torch.float64).cpu()
            curve = _tails(values, K) if shrink == 0 else _shrunk_tails(values, K, W, G, left, shrink)
            return LinearSpectrum.in_memory(values, left.cpu(), None, curve)
        values = output_spectrum(W, Gw).to(torch.float64).cpu()  # for allocation
        left, right = whiten_basis(W, whitening, K) if method == "whiten" else svd_basis(W, K)
        return LinearSpectrum.in_memory(values, left.cpu(), right.cpu(), _error_curve(W, G, left, right).cpu())

    return map_block(groups, method, dtype, device, work, shrink)


# ----------------------------------------------------------------------------- on disk


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class SpectrumStore:
    """A folder of per-block safetensors files holding eigenvalues, curves and bases."""

    def __init__(self, root: Path, temporary: bool):
        self.root = Path(root)
        self.temporary = temporary
        self.files: dict[str, str] = {}  # file name -> sha256

    @classmethod
    def create(cls, entry: Path | None) -> "SpectrumStore":
        """Next to ``entry`` (renamed into place by :meth:`commit`), or temporary when None."""
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            return cls(Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent)), False)
        tmp = cache_root() / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix="bases-", dir=tmp)), True)

    def add(self, index: int, spectra: dict[str, LinearSpectrum]) -> dict[str, LinearSpectrum]:
        """Write one block's spectra; returns them with the bases left on disk."""
        from safetensors.torch import save_file

        fname = f"block-{index:04d}.safetensors"
        tensors = {}
        for name, s in spectra.items():
            left, right = s.bases()
            tensors[f"{name}::values"] = s.values
            tensors[f"{name}::curve"] = s.curve
            tensors[f"{name}::left"] = left.float().contiguous()
            if right is not None:
                tensors[f"{name}::right"] = right.float().contiguous()
        save_file(tensors, str(self.root / fname))
        self.files[fname] = _sha256(self.root / fname)
        return {name: LinearSpectrum(s.values, s.curve, s.max_rank, partial(self._read, fname, name))
                for name, s in spectra.items()}

    def _read(self, fname: str, name: str) -> Bases:
        from safetensors import safe_open

        with safe_open(str(self.root / fname), framework="pt") as f:
            right = f.get_tensor(f"{name}::right") if f"{name}::right" in f.keys() else None
            return f.get_tensor(f"{name}::left"), right

    def commit(self, entry: Path, meta: dict, importance: list[float]) -> int:
        """Write meta.json, move the folder to ``entry`` (replacing a stale one); returns its bytes."""
        body = dict(meta, importance=importance, files=self.files)
        (self.root / "meta.json").write_text(json.dumps(body, indent=1))
        if entry.exists():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        os.replace(self.root, entry)
        self.root = entry
        return sum(p.stat().st_size for p in entry.iterdir())

    @classmethod
    def open(cls, entry: Path, meta: dict) -> tuple["ModelStats | None", str]:
        """(stats, "") on a valid entry; (None, reason) when missing, stale or corrupt."""
        from safetensors import safe_open

        if not (entry / "meta.json").is_file():
            return None, "missing"
        try:
            body = json.loads((entry / "meta.json").read_text())
            for key, want in meta.items():
                if body.get(key) != want:
                    return None, f"stale ({key} changed)"
            store = cls(entry, False)
            spectra = {}
            for fname, digest in body["files"].items():
                if _sha256(entry / fname) != digest:
                    return None, "corrupt (checksum mismatch)"
                store.files[fname] = digest
                with safe_open(str(entry / fname), framework="pt") as f:
                    names = sorted({k.rpartition("::")[0] for k in f.keys()})
                    for name in names:
                        left_shape = f.get_slice(f"{name}::left").get_shape()
                        spectra[name] = LinearSpectrum(f.get_tensor(f"{name}::values"), f.get_tensor(f"{name}::curve"),
                                                       left_shape[1], partial(store._read, fname, name))
            importance = [float(x) for x in body["importance"]]
        except (OSError, ValueError, KeyError, TypeError) as e:  # truncated / garbled files or meta
            return None, f"corrupt ({type(e).__name__}: {str(e)[:80]})"
        except Exception as e:  # safetensors raises its own error types on a garbled header
            return None, f"corrupt ({type(e).__name__}: {str(e)[:80]})"
        return ModelStats(spectra, importance, body, from_cache=True, store=store), ""


# ----------------------------------------------------------------------------- the cache key


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


def entry_path(folder: str | Path, calib_hash: str, method: str, precision: str = "fp32",
               device: str = "cpu", shrink: float = 0.0) -> Path:
    """A GPU's decompositions differ from the CPU's in the last bits (and, where eigenvalues at the
    cut are tied below round-off, in which eigenvectors are kept), so each device type has its own
    entry; so has each covariance shrinkage."""
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    kind = torch.device(device).type
    suffix = ("" if shrink == 0 else f"-shrink{shrink:g}") + ("" if kind == "cpu" else f"-{kind}")
    return cache_root() / "stats" / f"{Path(folder).name}-{key}" / f"{calib_hash[:16]}-{method}-{precision}{suffix}"


def expected_meta(folder: str | Path, calib: dict, method: str, precision: str = "fp32",
                  shrink: float = 0.0) -> dict:
    meta = {"cache_format": CACHE_FORMAT, "model_fingerprint": model_fingerprint(folder),
            "calib_sha256": calib["token_sha256"], "nsamples": calib["nsamples"],
            "seqlen": calib["seqlen"], "method": method, "precision": precision}
    return dict(meta, shrink=shrink) if shrink else meta  # entries made before --shrink stay valid
