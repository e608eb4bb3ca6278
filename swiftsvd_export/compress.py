"""The compression pipeline: model + calibration → covariances → factors → low-rank model folder."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .architectures import spec_for
from .atomic import atomic_dir, check_output
from .calibration import DEFAULT_CALIBRATION, build_calibration
from .covariance import BlockStats, calibrate
from .errors import SwiftSVDError
from .factorize import METHODS, factorize_group, reconstruction_error
from .lowrank import DTYPES, LowRankLinear, replace_module, save_lowrank
from .models import load_model
from .ranks import check_ratio, param_count, read_ranks_file, uniform_ranks

log = logging.getLogger(__name__)


@dataclass
class CompressConfig:
    model: str
    output: str | None
    ratio: float | None = None
    ranks_file: str | None = None
    method: str = "swift"
    calib: str | None = None
    text_field: str = "text"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    dtype: str = "fp16"
    sequential: bool = False
    rank_multiple: int = 1
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if (self.ratio is None) == (self.ranks_file is None):
            raise SwiftSVDError("give exactly one of --ratio or --ranks")
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.method not in METHODS:
            raise SwiftSVDError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise SwiftSVDError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.rank_multiple < 1:
            raise SwiftSVDError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")


@dataclass
class CompressResult:
    model: torch.nn.Module
    tokenizer: object
    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    errors: dict[str, tuple[float, float]]  # name -> (‖X(W−W')ᵀ‖², ‖XWᵀ‖²)
    importance: list[float]
    calibration: dict
    timings: dict[str, float] = field(default_factory=dict)
    jitter: dict[str, float] = field(default_factory=dict)

    @property
    def normalized_error(self) -> float:
        err = sum(e for e, _ in self.errors.values())
        energy = sum(n for _, n in self.errors.values())
        return err / energy if energy else 0.0

    def params(self) -> dict[str, float]:
        dense, after = param_count(self.shapes, self.ranks)
        total_after = sum(p.numel() for p in self.model.parameters())
        return {"linear_params_dense": dense, "linear_params_after": after,
                "achieved_ratio": 1.0 - after / dense,
                "model_params_dense": total_after - after + dense, "model_params_after": total_after}


def linear_shapes(model: torch.nn.Module, spec) -> dict[str, tuple[int, int]]:
    return {name: tuple(model.get_submodule(name).weight.shape) for name in spec.linear_names(model)}


def compress_model(model, tokenizer, cfg: CompressConfig, ranks: dict[str, int] | None = None,
                   compute_errors: bool = True) -> CompressResult:
    """Compress ``model`` in place (its linears become LowRankLinear) and report what was done."""
    spec = spec_for(model.config)
    shapes = linear_shapes(model, spec)
    if ranks is None:
        if cfg.ratio is not None:
            ranks = uniform_ranks(shapes, cfg.ratio, cfg.rank_multiple)
        else:
            ranks = read_ranks_file(cfg.ranks_file, shapes)
    t0 = time.perf_counter()
    calib = build_calibration(tokenizer, cfg.calib or DEFAULT_CALIBRATION, cfg.nsamples, cfg.seqlen,
                              cfg.seed, cfg.text_field)
    t_tok = time.perf_counter() - t0
    errors: dict[str, tuple[float, float]] = {}
    jitter: dict[str, float] = {}
    timers = {"factorize_s": 0.0, "error_s": 0.0}

    def on_block(layer: torch.nn.Module, stats: BlockStats) -> None:
        prefix = f"{spec.layers_path}.{stats.index}."
        for group in spec.groups:
            G = stats.grams[group.name]
            weights = {lin: layer.get_submodule(lin).weight.detach() for lin in group.linears}
            group_ranks = {lin: ranks[prefix + lin] for lin in group.linears if prefix + lin in ranks}
            t = time.perf_counter()
            factors = factorize_group(weights, G, group_ranks, cfg.method)
            timers["factorize_s"] += time.perf_counter() - t
            for lin, f in factors.items():
                old = layer.get_submodule(lin)
                new = LowRankLinear.from_factors(f.A.float(), f.B.float(), old.bias, dtype=old.weight.dtype)
                if compute_errors:
                    t = time.perf_counter()
                    errors[prefix + lin] = reconstruction_error(weights[lin], f.B @ f.A, G)
                    timers["error_s"] += time.perf_counter() - t
                if f.jitter:
                    jitter[prefix + lin] = f.jitter
                replace_module(layer, lin, new)

    t0 = time.perf_counter()
    stats = calibrate(model, spec, calib.ids, cfg.batch_size, on_block=on_block,
                      sequential=cfg.sequential, progress=cfg.progress)
    total = time.perf_counter() - t0
    timings = {"tokenize_s": t_tok, "calibration_s": total - timers["factorize_s"] - timers["error_s"],
               "factorize_s": timers["factorize_s"], "error_s": timers["error_s"]}
    timings["total_s"] = t_tok + timings["calibration_s"] + timings["factorize_s"]
    return CompressResult(model, tokenizer, ranks, shapes, errors, [s.importance for s in stats],
                          calib.describe(), timings, jitter)


def _versions() -> dict[str, str]:
    import transformers

    return {"swiftsvd_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def build_manifest(cfg: CompressConfig, result: CompressResult, source: str) -> dict:
    return {
        "method": cfg.method, "source_model": source, "ratio_requested": cfg.ratio,
        "ranks_file": cfg.ranks_file, "rank_multiple": cfg.rank_multiple, "sequential": cfg.sequential,
        "dtype": cfg.dtype, "calibration": result.calibration, **result.params(),
        "normalized_reconstruction_error": result.normalized_error,
        "block_importance": result.importance, "timings": result.timings,
        "cholesky_jitter": result.jitter, "ranks": result.ranks, "versions": _versions(),
        "config": asdict(cfg),
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def compress(cfg: CompressConfig) -> dict:
    """Run the whole job and write ``cfg.output`` atomically; returns the summary."""
    cfg.validate()
    out = Path(cfg.output)
    check_output(out, cfg.overwrite)
    model, tokenizer, folder = load_model(cfg.model)
    result = compress_model(model, tokenizer, cfg)
    manifest = build_manifest(cfg, result, str(folder))
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        save_lowrank(model, tmp, cfg.dtype, manifest, tokenizer)
    params = result.params()
    itemsize = DTYPES[cfg.dtype].itemsize
    summary = {**params, "normalized_reconstruction_error": result.normalized_error,
               "factorized_linears": len(result.ranks), "linears": len(result.shapes),
               "output_bytes": folder_bytes(out), "weights_bytes": (out / "model.safetensors").stat().st_size,
               "dense_weights_bytes_same_dtype": params["model_params_dense"] * itemsize,
               "timings": result.timings, "output": str(out)}
    return summary


def format_summary(s: dict) -> str:
    rows = [
        ("linears factorized", f"{s['factorized_linears']} / {s['linears']}"),
        ("params (compressible linears)", f"{s['linear_params_dense']:,} -> {s['linear_params_after']:,}"),
        ("params (whole model)", f"{s['model_params_dense']:,} -> {s['model_params_after']:,}"),
        ("achieved ratio (linears)", f"{s['achieved_ratio']:.4f}"),
        ("normalized reconstruction error", f"{s['normalized_reconstruction_error']:.4e}"),
        ("model.safetensors bytes", f"{s['weights_bytes']:,} (dense at this dtype: {s['dense_weights_bytes_same_dtype']:,})"),
        ("output folder bytes", f"{s['output_bytes']:,}"),
        ("time (calibration / factorization / total)",
         f"{s['timings']['calibration_s']:.1f} s / {s['timings']['factorize_s']:.1f} s / {s['timings']['total_s']:.1f} s"),
        ("written to", s["output"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
