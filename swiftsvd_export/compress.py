"""The compression pipeline: model + calibration → covariances → factors → low-rank model folder.

Flow (non-sequential, the default): one calibration pass accumulates every block's input
covariances and, block by block, decomposes each linear once (``stats_cache.decompose_block``:
eigenvalues of C = W·G·Wᵀ, factor bases up to the break-even rank, error curve). Those
statistics are cached on disk (``stats_cache``), so any later ratio, allocation or budget on
the same model + calibration set skips calibration and only slices factors (re-targeting).
Ranks come from ``--ratio`` (uniform formula or ``--allocation dynamic``, see
``allocation``), ``--ranks``, ``--target-bytes`` (bytes → parameter budget at the dtype) or
``--max-ppl-increase`` (bisection over ratios on a held-out slice of the calibration text).
With ``--sequential`` block i is factorized on the outputs of the already-compressed blocks
(no cache for that pass; dynamic ranks come from the cached dense statistics), optionally
with the least-squares refit of B (``--refit``).
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__, distributed
from .architectures import spec_for
from .atomic import atomic_dir, check_output
from .allocation import allocation_summary, dynamic_ranks, min_max_linear_params, uniform_ranks_for_budget
from .calibration import DEFAULT_CALIBRATION, CalibrationSet, build_calibration
from .covariance import BlockStats, calibrate
from .devices import resolve_device
from .errors import SwiftSVDError
from .factorize import METHODS, PRECISIONS
from .importance import LossImportance
from .lowrank import DTYPES, LowRankLinear, replace_module, save_lowrank
from .memory import release_free_heap
from .models import load_model
from .ranks import check_ratio, param_count, read_ranks_file, uniform_ranks
from .stats_cache import LinearSpectrum, ModelStats, SpectrumStore, decompose_block, entry_path, expected_meta

log = logging.getLogger(__name__)


ALLOCATIONS = ("uniform", "dynamic")
IMPORTANCES = ("cos", "loss")
# --refit's pull toward the plain factors (refit_b), chosen on held-out calibration windows
# (SmolLM2, ratio 0.2: tools/bench_allocation.py refit --refit-ridges 1e-2 1).
REFIT_RIDGE = 1e-1


@dataclass
class CompressConfig:
    model: str
    output: str | None
    ratio: float | None = None
    ranks_file: str | None = None
    method: str = "swift"
    precision: str = "fp32"  # working precision of the decompositions (fp32 or fp64)
    # covariance shrinkage toward the diagonal, in [0, 1) (factorize.shrink_gram); 0 = the exact objective.
    # Not on by default: it helps SmolLM2 and hurts Gemma 3 (README, "Covariance shrinkage")
    shrink: float = 0.0
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
    allocation: str = "dynamic"  # beats uniform at 0.2/0.4/0.6 on SmolLM2 (README); ignored with ranks_file
    alpha: float = 1.0  # dynamic allocation: weight of block importance vs output norm (held-out choice)
    importance: str = "cos"  # dynamic allocation: block importance, cos (1 - cos) or loss (importance.py)
    importance_windows: int = 8  # calibration windows for --importance loss
    target_bytes: int | None = None
    max_ppl_increase: float | None = None  # percent
    holdout: int = 8  # held-out calibration windows for --max-ppl-increase and the ppl plot
    cache: bool = True
    plots: bool = False
    refit: bool = False  # sequential only: least-squares refit of B against the dense outputs
    refit_ridge: float = REFIT_RIDGE  # the refit's pull toward the plain factors (refit_b)
    device: str = "cpu"  # where the covariance pass and the decompositions run (cpu, cuda, cuda:N)
    dist_timeout: float | None = None  # torch.distributed collective timeout, s (None: env or default)

    def validate(self) -> None:
        given = [x is not None for x in (self.ratio, self.ranks_file, self.target_bytes, self.max_ppl_increase)]
        if sum(given) != 1:
            raise SwiftSVDError("give exactly one of --ratio, --ranks, --target-bytes or --max-ppl-increase")
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.target_bytes is not None and self.target_bytes <= 0:
            raise SwiftSVDError(f"--target-bytes must be a positive number of bytes, got {self.target_bytes}")
        if self.max_ppl_increase is not None and not (self.max_ppl_increase >= 0 and math.isfinite(self.max_ppl_increase)):
            raise SwiftSVDError(f"--max-ppl-increase must be a percentage >= 0, got {self.max_ppl_increase} "
                                "(a perplexity can only rise when compressing)")
        if self.method not in METHODS:
            raise SwiftSVDError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= self.shrink < 1:
            raise SwiftSVDError(f"--shrink must be in [0, 1), got {self.shrink}")
        if self.precision not in PRECISIONS:
            raise SwiftSVDError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.dtype not in DTYPES:
            raise SwiftSVDError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.rank_multiple < 1:
            raise SwiftSVDError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        if self.allocation not in ALLOCATIONS:
            raise SwiftSVDError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.importance not in IMPORTANCES:
            raise SwiftSVDError(f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCES)}")
        if self.importance_windows < 1:
            raise SwiftSVDError(f"--importance-windows must be >= 1, got {self.importance_windows}")
        if not 0 <= self.alpha <= 1:
            raise SwiftSVDError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not (self.refit_ridge > 0 and math.isfinite(self.refit_ridge)):
            raise SwiftSVDError(f"--refit-ridge must be a positive number, got {self.refit_ridge}")
        if self.refit and not self.sequential:
            raise SwiftSVDError("--refit needs --sequential (without it the Swift-SVD factors are already optimal)")
        if self.holdout < 1 and (self.max_ppl_increase is not None or self.plots):
            raise SwiftSVDError(f"--holdout must be >= 1, got {self.holdout}")
        resolve_device(self.device)
        distributed.timeout_seconds(self.dist_timeout)


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
    choice: dict = field(default_factory=dict)  # how the ranks were chosen (budget, search trace)
    stats: ModelStats | None = None

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


# ----------------------------------------------------------------------------- calibration data


@torch.no_grad()
def heldout_ppl(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on held-out windows (n, seqlen): every next-token prediction scored."""
    model.eval()
    device = next(model.parameters()).device  # score where the model is, as perplexity() does
    nll, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- statistics


def gather_stats(model, spec, calib: CalibrationSet, cfg: CompressConfig, source=None,
                 timers: dict | None = None, run_pass=calibrate) -> ModelStats:
    """Decompositions of every compressible linear: from the cache when valid, else one
    (non-sequential) calibration pass (``run_pass``: ``calibrate``, or layer streaming's). The bases
    go to disk block by block (the cache entry when ``cfg.cache``, else a temporary folder:
    ``ModelStats.close`` removes it)."""
    timers = timers if timers is not None else {}
    path = meta = None
    if cfg.cache and source is not None:
        meta = expected_meta(source, calib.describe(), cfg.method, cfg.precision, cfg.shrink)
        path = entry_path(source, calib.hash, cfg.method, cfg.precision, cfg.device, cfg.shrink)
        t = time.perf_counter()
        stats, why = SpectrumStore.open(path, meta)
        timers["cache_load_s"] = time.perf_counter() - t
        if stats is not None and set(stats.spectra) == set(linear_shapes(model, spec)):
            log.info("statistics cache hit: %s", path)
            stats.meta["path"] = str(path)
            return stats
        if stats is not None:
            why = "stale (different set of linears)"
        if why != "missing":
            msg = f"statistics cache entry {path} is {why}; recomputing it"
            log.warning(msg)
            print(f"warning: {msg}", file=sys.stderr)
    store = SpectrumStore.create(path)
    spectra: dict[str, LinearSpectrum] = {}
    timers.setdefault("factorize_s", 0.0)

    def on_block(layer, stats: BlockStats) -> None:
        prefix = f"{spec.layers_path}.{stats.index}."
        t = time.perf_counter()
        block = decompose_block([({prefix + lin: layer.get_submodule(lin).weight for lin in group.linears},
                                  stats.grams[group.name]) for group in spec.groups],
                                cfg.method, cfg.precision, device, cfg.shrink)
        stats.grams.clear()
        spectra.update(store.add(stats.index, block))
        del block
        release_free_heap()
        timers["factorize_s"] += time.perf_counter() - t

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    try:
        blocks = run_pass(model, spec, calib.ids, cfg.batch_size, on_block=on_block, sequential=False,
                          progress=cfg.progress, device=device)
    except BaseException:
        shutil.rmtree(store.root, ignore_errors=True)
        raise
    timers["calibration_s"] = time.perf_counter() - t0 - timers["factorize_s"]
    stats = ModelStats(spectra, [b.importance for b in blocks], store=store)
    if path is not None:
        t = time.perf_counter()
        size = store.commit(path, meta, stats.importance)
        timers["cache_write_s"] = time.perf_counter() - t
        stats.meta = dict(meta, path=str(path), bytes=size)
        log.info("statistics cached at %s (%.1f MB)", path, size / 1e6)
    return stats


def apply_factors(model, stats: ModelStats, ranks: dict[str, int],
                  errors: dict | None = None) -> dict[str, torch.nn.Module]:
    """Replace every linear in ``ranks`` by its rank-k factors; returns the replaced modules."""
    originals = {}
    for name, k in ranks.items():
        old = model.get_submodule(name)
        A, B = stats.spectra[name].factors(old.weight.detach(), k)
        new = LowRankLinear.from_factors(A.float(), B.float(), old.bias, dtype=old.weight.dtype)
        if errors is not None:
            errors[name] = stats.spectra[name].error(k)
        replace_module(model, name, new)
        originals[name] = old
    return originals


def restore(model, originals: dict[str, torch.nn.Module]) -> None:
    for name, mod in originals.items():
        replace_module(model, name, mod)


# ----------------------------------------------------------------------------- budgets


def _linear_weight_keys(shapes) -> set[str]:
    return {f"{name}.weight" for name in shapes}


def file_layout(model, shapes, dtype: str) -> dict:
    """Byte accounting of model.safetensors at ``dtype``: fixed part and per-parameter size."""
    itemsize = DTYPES[dtype].itemsize
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    lin = _linear_weight_keys(shapes)
    base = sum(v.numel() for k, v in sd.items() if k not in lin)
    embed = sum(v.numel() for k, v in sd.items() if "embed" in k or k.startswith("lm_head"))
    # Upper bound of the JSON header: every linear factorized (two entries), 12-digit numbers.
    names = [k for k in sd if k not in lin] + [f"{n}.{ab}.weight" for n in shapes for ab in "AB"] + list(lin)
    entry = '"{}":{{"dtype":"F16","shape":[999999,999999],"data_offsets":[999999999999,999999999999]}},'
    header = sum(len(entry.format(n)) for n in names) + 200
    return {"itemsize": itemsize, "base_params": base, "embedding_params": embed, "header_bound": header + 8}


def bytes_for(layout: dict, linear_params: int) -> int:
    return layout["header_bound"] + (layout["base_params"] + linear_params) * layout["itemsize"]


def choose_ranks(shapes, budget: int, cfg: CompressConfig, stats: ModelStats | None) -> dict[str, int]:
    """Ranks for a parameter budget on the compressible linears, with cfg.allocation."""
    if cfg.allocation == "dynamic":
        importance = stats.importance_at(budget) if stats.importance_at else stats.importance
        return dynamic_ranks(shapes, stats.values(), importance, budget, cfg.rank_multiple, cfg.alpha)
    return uniform_ranks_for_budget(shapes, budget, cfg.rank_multiple)[0]


def ratio_budget(shapes, ratio: float, multiple: int = 1) -> int:
    """(1 − ratio) x the dense linear parameters, raised to the smallest achievable count (every
    matrix at rank ``multiple``) as the uniform formula's floor at the multiple does."""
    dense = sum(m * n for m, n in shapes.values())
    return max(int(round((1.0 - ratio) * dense)), min_max_linear_params(shapes, multiple)[0])


def ranks_for_ratio(shapes, ratio: float, cfg: CompressConfig, stats: ModelStats | None) -> dict[str, int]:
    if cfg.allocation == "dynamic":
        return choose_ranks(shapes, ratio_budget(shapes, ratio, cfg.rank_multiple), cfg, stats)
    return uniform_ranks(shapes, ratio, cfg.rank_multiple)


def target_bytes_budget(model, shapes, cfg: CompressConfig) -> tuple[int, dict]:
    """Linear-parameter budget for --target-bytes, or an error naming the achievable range."""
    layout = file_layout(model, shapes, cfg.dtype)
    lo, _ = min_max_linear_params(shapes, cfg.rank_multiple)
    dense = sum(m * n for m, n in shapes.values())
    smallest, largest = bytes_for(layout, lo), bytes_for(layout, dense)
    N = cfg.target_bytes
    if N < smallest or N >= largest:
        emb = layout["embedding_params"] * layout["itemsize"]
        why = (f"below the smallest achievable {smallest:,} bytes (the embeddings alone take {emb:,} bytes, "
               f"every other tensor at rank {cfg.rank_multiple})" if N < smallest else
               f"not below the dense model's {largest:,} bytes, so nothing needs compressing")
        raise SwiftSVDError(f"--target-bytes {N:,} cannot be met at {cfg.dtype}: it is {why}; "
                            f"achievable sizes are {smallest:,} to {largest - 1:,} bytes")
    budget = (N - layout["header_bound"]) // layout["itemsize"] - layout["base_params"]
    return budget, {"layout": layout, "smallest_bytes": smallest, "dense_bytes": largest}


def search_ppl(model, shapes, stats: ModelStats, holdout: torch.Tensor, cfg: CompressConfig,
               say=print) -> tuple[dict[str, int], dict]:
    """Largest ratio (bisection, 7 steps over (0, 0.95]) whose held-out ppl rises ≤ P %."""
    t0 = time.perf_counter()
    base = heldout_ppl(model, holdout, cfg.batch_size)
    limit = base * (1 + cfg.max_ppl_increase / 100)
    trace = []

    def evaluate(r):
        ranks = ranks_for_ratio(shapes, r, cfg, stats)
        originals = apply_factors(model, stats, ranks)
        try:
            p = heldout_ppl(model, holdout, cfg.batch_size)
        finally:
            restore(model, originals)
        trace.append({"ratio": r, "ppl": p, "increase_pct": 100 * (p / base - 1)})
        return ranks, p

    lo, hi = 0.0, 0.95
    best = None
    for _ in range(7):
        mid = round((lo + hi) / 2, 4)
        ranks, p = evaluate(mid)
        if p <= limit:
            best, lo = (mid, ranks, p), mid
        else:
            hi = mid
    if best is None:  # even tiny compression breaks the limit: take the smallest ratio tried
        mid = round(hi / 2, 4) if hi > 0.01 else 0.01
        ranks, p = evaluate(0.01)
        best = (0.01, ranks, p)
    r, ranks, p = best
    info = {"heldout_windows": int(holdout.shape[0]), "dense_heldout_ppl": base, "limit_ppl": limit,
            "chosen_ratio": r, "chosen_heldout_ppl": p, "trace": trace, "search_s": time.perf_counter() - t0}
    above = [t for t in trace if t["ratio"] > r]
    nxt = min(above, key=lambda t: t["ratio"]) if above else None
    say(f"--max-ppl-increase {cfg.max_ppl_increase}%: dense held-out ppl {base:.3f} on {holdout.shape[0]} windows "
        f"x {holdout.shape[1]} tokens (limit {limit:.3f}); chose ratio {r} ({cfg.allocation}) with ppl {p:.3f} "
        f"(+{100 * (p / base - 1):.2f}%)"
        + (f"; ratio {nxt['ratio']} would give +{nxt['increase_pct']:.2f}%" if nxt else "")
        + (" — even the smallest ratio exceeds the limit" if p > limit else ""))
    return ranks, info


def ppl_curve(model, shapes, stats: ModelStats, holdout: torch.Tensor, cfg: CompressConfig,
              ratios=(0.2, 0.4, 0.6)) -> dict:
    """Held-out perplexity at several ratios, uniform and dynamic (for the plot)."""
    curve = {"dense": heldout_ppl(model, holdout, cfg.batch_size), "ratios": list(ratios)}
    for alloc in ALLOCATIONS:
        sub = CompressConfig(**{**asdict(cfg), "allocation": alloc})
        points = []
        for r in ratios:
            originals = apply_factors(model, stats, ranks_for_ratio(shapes, r, sub, stats))
            try:
                points.append(heldout_ppl(model, holdout, cfg.batch_size))
            finally:
                restore(model, originals)
        curve[alloc] = points
    return curve


def refit_b(A: torch.Tensor, B0: torch.Tensor, W: torch.Tensor, G_cc: torch.Tensor, G_cd: torch.Tensor,
            ridge: float = REFIT_RIDGE) -> torch.Tensor:
    """Training-free refit of B given A (sequential mode).

    With X_c the linear's input on the compressed path and X_d its input in the dense model,
    minimise ‖X_c·Aᵀ·Bᵀ − X_d·Wᵀ‖²_F + λ‖B − B₀‖²_F over B (A fixed), with B₀ the factors' own B
    (for swift, the least-squares B for the compressed-path inputs without the correction):
    Bᵀ = (A·G_cc·Aᵀ + λI)⁻¹ (A·G_cd·Wᵀ + λB₀ᵀ), G_cc = X_cᵀX_c, G_cd = X_cᵀX_d and λ = ``ridge`` x
    the mean diagonal of A·G_cc·Aᵀ. The pull toward B₀ leaves the directions of A·x that the
    calibration barely excites where the plain factors put them instead of fitting them to noise:
    with a ridge toward zero (1e-6) the refit amplified a 1e-6 change of the weights about 1000x in
    the logits and lost to the plain sequential pass (SmolLM2 at ratio 0.2, held-out ppl 144 vs 104).
    """
    A, B0, W = A.to(torch.float64), B0.to(torch.float64), W.to(torch.float64)
    M = A @ G_cc.to(torch.float64) @ A.T
    lam = ridge * M.diagonal().mean().clamp_min(1e-30)
    M = M + lam * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    rhs = A @ G_cd.to(torch.float64) @ W.T + lam * B0.T
    return torch.linalg.solve(M, rhs).T


# ----------------------------------------------------------------------------- the pipeline


def first_choice(model, shapes, cfg: CompressConfig, budget: bool = True) -> dict:
    """What the run reports about its choices, started before calibrating: the allocation and,
    with ``budget`` (ranks still to choose) and --target-bytes, the linear budget (an impossible
    size fails here, before any work)."""
    choice: dict = {"allocation": "ranks file" if cfg.ranks_file else cfg.allocation}
    if budget and cfg.target_bytes is not None:
        budget, info = target_bytes_budget(model, shapes, cfg)
        choice.update(target_bytes=cfg.target_bytes, linear_budget=budget, smallest_bytes=info["smallest_bytes"],
                      dense_bytes=info["dense_bytes"], header_bound=info["layout"]["header_bound"])
    return choice


def select_ranks(model, shapes, cfg: CompressConfig, stats: ModelStats | None, choice: dict, say,
                 holdout: torch.Tensor | None = None) -> dict[str, int]:
    """The ranks for cfg's budget (--ratio, --ranks, --target-bytes or --max-ppl-increase); the
    budgets say what they chose and why, and ``choice`` records it."""
    if cfg.ratio is not None:
        if cfg.allocation == "dynamic":
            choice["linear_budget"] = ratio_budget(shapes, cfg.ratio, cfg.rank_multiple)
        return ranks_for_ratio(shapes, cfg.ratio, cfg, stats)
    if cfg.ranks_file is not None:
        return read_ranks_file(cfg.ranks_file, shapes)
    if cfg.target_bytes is not None:
        ranks = choose_ranks(shapes, choice["linear_budget"], cfg, stats)
        after = param_count(shapes, ranks)[1]
        layout = file_layout(model, shapes, cfg.dtype)
        dense = sum(m * n for m, n in shapes.values())
        say(f"--target-bytes {cfg.target_bytes:,}: at {cfg.dtype} ({layout['itemsize']} B/param) the "
            f"non-factorizable tensors take {layout['base_params'] * layout['itemsize']:,} bytes and the header "
            f"at most {layout['header_bound']:,}, leaving {choice['linear_budget']:,} parameters for the linears; "
            f"{cfg.allocation} allocation uses {after:,} (ratio {1 - after / dense:.4f}), "
            f"predicted file <= {bytes_for(layout, after):,} bytes")
        return ranks
    ranks, info = search_ppl(model, shapes, stats, holdout, cfg, say)
    choice.update(max_ppl_increase=cfg.max_ppl_increase, **info)
    return ranks


def compress_model(model, tokenizer, cfg: CompressConfig, ranks: dict[str, int] | None = None,
                   compute_errors: bool = True, source=None, say=None) -> CompressResult:
    """Compress ``model`` in place (its linears become LowRankLinear) and report what was done.

    ``source`` (the model folder) enables the statistics cache (unless ``cfg.cache`` is off);
    without it every call calibrates. ``say`` receives the one-line explanations of budget choices.
    """
    say = say or (lambda msg: log.info(msg))
    spec = spec_for(model.config)
    shapes = linear_shapes(model, spec)
    timers: dict[str, float] = {"factorize_s": 0.0}
    choice = first_choice(model, shapes, cfg, budget=ranks is None)
    t_start = time.perf_counter()
    need_holdout = cfg.max_ppl_increase is not None or cfg.plots
    calib = build_calibration(tokenizer, cfg.calib or DEFAULT_CALIBRATION, cfg.nsamples, cfg.seqlen, cfg.seed,
                              cfg.text_field, holdout=cfg.holdout if need_holdout else 0, cache=cfg.cache)
    holdout = calib.holdout
    distributed.check_same(cfg, calib, model)
    timers["tokenize_s"] = time.perf_counter() - t_start
    need_stats = (not cfg.sequential) or (cfg.allocation == "dynamic" and cfg.ranks_file is None) \
        or cfg.max_ppl_increase is not None or cfg.plots
    stats = gather_stats(model, spec, calib, cfg, source, timers) if need_stats else None
    loss_imp = None
    if stats is not None and cfg.allocation == "dynamic" and cfg.importance == "loss":
        loss_imp = stats.importance_at = LossImportance(
            model, spec, shapes, calib.ids, lambda r: apply_factors(model, stats, r), lambda o: restore(model, o),
            cfg.rank_multiple, cfg.importance_windows, cfg.batch_size, stats.meta.get("path"))
    try:
        if ranks is None:
            ranks = select_ranks(model, shapes, cfg, stats, choice, say, holdout)
        if cfg.plots and stats is not None:
            choice["ppl_curve"] = ppl_curve(model, shapes, stats, holdout, cfg)
        errors: dict[str, tuple[float, float]] = {}
        jitter: dict[str, float] = {}
        t = time.perf_counter()
        if not cfg.sequential:
            apply_factors(model, stats, ranks, errors if compute_errors else None)
            timers["build_s"] = time.perf_counter() - t
        else:
            seq_factorize = 0.0

            def on_block(layer, bstats: BlockStats) -> None:
                nonlocal seq_factorize
                prefix = f"{spec.layers_path}.{bstats.index}."
                t1 = time.perf_counter()
                # with --refit, one group per call (covariance.calibrate)
                groups = [({prefix + lin: layer.get_submodule(lin).weight for lin in group.linears
                            if prefix + lin in ranks}, group) for group in spec.groups if group.name in bstats.grams]
                groups = [(weights, group) for weights, group in groups if weights]
                spectra = decompose_block([(weights, bstats.grams[group.name]) for weights, group in groups],
                                          cfg.method, cfg.precision, device, cfg.shrink)
                for weights, group in groups:
                    for name, k in ((n, ranks[n]) for n in weights):
                        lin = name[len(prefix):]
                        old = layer.get_submodule(lin)
                        A, B = spectra[name].factors(old.weight.detach(), k)
                        if cfg.refit:
                            B = refit_b(A, B, old.weight.detach(), bstats.grams[group.name],
                                        bstats.extra["cross"][group.name], cfg.refit_ridge)
                        if compute_errors:
                            errors[name] = spectra[name].error(k)
                        replace_module(layer, lin, LowRankLinear.from_factors(A.float(), B.float(), old.bias,
                                                                              dtype=old.weight.dtype))
                seq_factorize += time.perf_counter() - t1

            device = resolve_device(cfg.device)
            blocks = calibrate(model, spec, calib.ids, cfg.batch_size, on_block=on_block, sequential=True,
                               progress=cfg.progress, cross=cfg.refit, device=device)
            timers["sequential_s"] = time.perf_counter() - t
            timers["factorize_s"] += seq_factorize
            if stats is None:
                stats = ModelStats({}, [b.importance for b in blocks])
    finally:
        if stats is not None:
            stats.close()  # a temporary bases folder (cache off) goes now
    timers["total_s"] = time.perf_counter() - t_start
    timers.setdefault("calibration_s", 0.0)
    if choice["allocation"] == "dynamic":
        choice["importance"] = cfg.importance
    if loss_imp is not None:
        timers["loss_importance_s"] = loss_imp.seconds
        choice["loss_importance"] = loss_imp.used
    if stats is not None and stats.from_cache:
        choice["stats_cache"] = "hit"
    elif stats is not None and stats.meta.get("path"):
        choice["stats_cache"] = "written"
    else:
        choice["stats_cache"] = "off"
    if stats is not None and stats.meta.get("path"):
        choice["stats_cache_path"] = stats.meta["path"]
    return CompressResult(model, tokenizer, ranks, shapes, errors, list(stats.importance) if stats else [],
                          calib.describe(), timers, jitter, choice, stats)


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
        "config": asdict(cfg), "allocation": result.choice["allocation"], "alpha": cfg.alpha,
        "choice": {k: v for k, v in result.choice.items() if k != "trace"},
        "ppl_search_trace": result.choice.get("trace"),
        "linears": allocation_summary(result.shapes, result.ranks, result.stats.values()) if result.stats else {},
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def compress(cfg: CompressConfig) -> dict | None:
    """Run the whole job and write ``cfg.output`` atomically; returns the summary (None on the
    ranks other than 0 under torchrun: they only calibrate their shard, see ``distributed``)."""
    cfg.validate()
    if distributed.start(cfg.device, cfg.dist_timeout):
        return distributed.follow(cfg)
    out = Path(cfg.output)
    check_output(out, cfg.overwrite)
    model, tokenizer, folder = load_model(cfg.model)
    result = compress_model(model, tokenizer, cfg, source=folder,
                            say=lambda msg: print(msg, file=sys.stderr, flush=True))
    distributed.finish()
    manifest = build_manifest(cfg, result, str(folder))
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        save_lowrank(model, tmp, cfg.dtype, manifest, tokenizer)
        if cfg.plots:
            from .plots import plot_ppl_vs_ratio, plot_ranks

            plot_ranks(result.shapes, result.ranks, tmp / "ranks.png",
                       title=f"{Path(cfg.model).name}: ranks ({cfg.allocation})")
            if "ppl_curve" in result.choice:
                plot_ppl_vs_ratio(result.choice["ppl_curve"], tmp / "ppl_vs_ratio.png",
                                  ylabel=f"held-out calibration ppl ({cfg.holdout} x {cfg.seqlen} tokens)")
    return summarize(cfg, result, out)


def summarize(cfg: CompressConfig, result: CompressResult, out: Path) -> dict:
    """The job's summary of a written output folder (and the --target-bytes promise checked on it)."""
    params = result.params()
    summary = {**params, "normalized_reconstruction_error": result.normalized_error,
               "factorized_linears": len(result.ranks), "linears": len(result.shapes),
               "output_bytes": folder_bytes(out), "weights_bytes": (out / "model.safetensors").stat().st_size,
               "dense_weights_bytes_same_dtype": params["model_params_dense"] * DTYPES[cfg.dtype].itemsize,
               "timings": result.timings, "output": str(out), "allocation": result.choice["allocation"],
               "choice": {k: v for k, v in result.choice.items() if k != "trace"}}
    if cfg.target_bytes is not None and summary["weights_bytes"] > cfg.target_bytes:
        raise SwiftSVDError(f"internal: model.safetensors is {summary['weights_bytes']:,} bytes, above "
                            f"--target-bytes {cfg.target_bytes:,}")
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
        ("allocation", s.get("allocation", "uniform")),
        ("statistics cache", f"{s.get('choice', {}).get('stats_cache', 'off')} {s.get('choice', {}).get('stats_cache_path', '')}".strip()),
        ("time (calibration / factorization / total)",
         f"{s['timings'].get('calibration_s', 0.0):.1f} s / {s['timings'].get('factorize_s', 0.0):.1f} s / {s['timings']['total_s']:.1f} s"),
        ("written to", s["output"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
