"""Layer streaming: compress a model that is never materialized (``compress --stream`` or ``--max-memory``).

The model is a weightless skeleton (parameters on the meta device). Two passes over the
decoder blocks, each holding one block's weights at a time (``weights_source``):

1. Statistics. Block 0's inputs come from the embeddings (``covariance.capture_block_inputs``,
   one batch at a time); then for block i: load its weights, run the calibration batches
   through it accumulating the input covariances exactly as ``covariance.calibrate`` does
   (same batches, float32 Grams into float64), keep its outputs as block i+1's inputs, hand
   the statistics to ``compress.gather_stats`` (the same eigendecompositions, bases spilled
   to the ``SpectrumStore`` block by block, the same statistics cache), drop the weights.
   Activations stay in RAM, or in two files read and written one batch at a time when
   ``--max-memory`` leaves no room for them (``memory_budget``).
2. Output. Ranks are chosen from the statistics as in memory (uniform, dynamic, ``--ranks``,
   ``--target-bytes``); then, block by block, the dense weights are read again, the factors
   built from the stored bases, and the block's tensors written straight into the output's
   ``model.safetensors`` (``safetensors_writer``), whose header is known once the ranks are.

Same calibration, same factors: the output equals ``compress`` without streaming (the tests
compare the tensors). Not available with streaming: ``--sequential``/``--refit``,
``--max-ppl-increase`` and ``--plots`` (they evaluate the whole model repeatedly). A GGUF
source is read directly (dequantized tensor by tensor); its statistics are not cached.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import linalg_pool, memory_budget
from .architectures import spec_for
from .atomic import atomic_dir, check_output
from .calibration import DEFAULT_CALIBRATION, build_calibration
from .compress import (CompressConfig, CompressResult, build_manifest, first_choice, format_summary, gather_stats,
                       linear_shapes, select_ranks, summarize)
from .covariance import (BlockStats, block_forward, capture_block_inputs, check_finite_grams, cosine_sum,
                         gram_accumulators, input_hooks, kwargs_for, mirror_gram)
from .errors import SwiftSVDError
from .lowrank import DTYPES, FORMAT_VERSION, LowRankLinear, _materialize_buffers, _state_dict_for_saving, \
    replace_module, save_lowrank
from .memory import release_free_heap
from .paths import cache_root
from .safetensors_writer import SafetensorsWriter
from .weights_source import GGUFSource, SafetensorsSource



# ----------------------------------------------------------------------------- source and skeleton


def skeleton(config) -> nn.Module:
    """The CausalLM for ``config`` with every parameter on the meta device (real rotary buffers)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _materialize_buffers(model, config, torch.float32)
    return model.eval()


def open_source(model_arg: str):
    """(config, tokenizer, skeleton, weight source, cache key folder or None) for a dense checkpoint."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .lowrank import is_lowrank_folder
    from .models import model_path, read_gguf_header

    path = model_path(model_arg)
    if path.is_file():
        config, tokenizer = read_gguf_header(path)
        model = skeleton(config)
        return config, tokenizer, model, GGUFSource(path, model), None
    if not (path / "config.json").is_file():
        raise SwiftSVDError(f"{path}: not a transformers model folder (no config.json)")
    if is_lowrank_folder(path):
        raise SwiftSVDError(f"{path} is already a compressed (low-rank) folder; streaming reads dense checkpoints")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise SwiftSVDError(f"{path}: cannot read config.json ({e})") from None
    spec_for(config)
    source = SafetensorsSource(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SwiftSVDError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = skeleton(config)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return config, tokenizer, model, source, path


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(tensors, strict=False, assign=True)


def _drop(model: nn.Module, names) -> None:
    """Put the named parameters back on the meta device (their memory goes)."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        mod = model.get_submodule(owner)
        old = getattr(mod, attr)
        setattr(mod, attr, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=False))


# ----------------------------------------------------------------------------- activations


class Activations:
    """n x seqlen x hidden float32 states: one tensor in RAM, or a file read and written by batch."""

    def __init__(self, shape: tuple[int, int, int], folder: Path | None):
        self.shape = shape
        self.row_bytes = 4 * shape[1] * shape[2]
        self.path = None
        if folder is None:
            self.ram = torch.empty(shape, dtype=torch.float32)
            return
        self.ram = None
        fd, name = tempfile.mkstemp(prefix="acts-", suffix=".f32", dir=folder)
        self.path, self.fd = Path(name), fd
        os.ftruncate(fd, shape[0] * self.row_bytes)

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.ram is not None:
            return self.ram[start:stop]
        stop = min(stop, self.shape[0])
        out = torch.empty((stop - start, *self.shape[1:]), dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        got = 0
        while got < len(view):
            got += os.preadv(self.fd, [view[got:]], start * self.row_bytes + got)
        return out

    def write(self, start: int, t: torch.Tensor) -> None:
        if self.ram is not None:
            self.ram[start:start + t.shape[0]] = t
            return
        from .safetensors_writer import _pwrite_all

        _pwrite_all(self.fd, memoryview(t.detach().float().contiguous().numpy()), start * self.row_bytes)

    def close(self) -> None:
        if self.path is not None:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- pass 1: statistics


class StreamingPass:
    """Drop-in for ``covariance.calibrate`` (non-sequential) on a skeleton, loading one block at a time."""

    def __init__(self, source, plan: memory_budget.MemoryPlan, workdir: Path | None):
        self.source, self.plan, self.workdir = source, plan, workdir
        self.peaks: list[int] = []  # VmHWM after each block

    def check(self, where: str) -> None:
        now, peak = memory_budget.rss_bytes()
        self.peaks.append(peak)
        if self.plan.budget is not None and peak > self.plan.budget:
            raise SwiftSVDError(f"peak RSS {memory_budget.gib(peak)} went over --max-memory "
                                f"{memory_budget.gib(self.plan.budget)} ({where}; estimated "
                                f"{memory_budget.gib(self.plan.planned)}); give more memory or lower --batch-size")

    @torch.no_grad()
    def __call__(self, model: nn.Module, spec, ids: torch.Tensor, batch_size: int = 8, on_block=None,
                 sequential: bool = False, progress: bool = True, **_) -> list[BlockStats]:
        if sequential:
            raise SwiftSVDError("--sequential is not available with layer streaming")
        n, seqlen = ids.shape
        shape = (n, seqlen, model.config.hidden_size)
        folder = self.workdir if self.plan.spill else None
        hidden, outs = Activations(shape, folder), Activations(shape, folder)
        try:
            kwargs = self._capture(model, spec, ids, batch_size, hidden)
            results = []
            layers = spec.layers(model)
            for i in tqdm(range(len(layers)), desc="streaming blocks", disable=not progress, unit="block"):
                results.append(self._block(model, spec, i, hidden, outs, kwargs, batch_size, on_block))
                hidden, outs = outs, hidden
                self.check(f"after block {i}")
            return results
        finally:
            hidden.close()
            outs.close()

    def _capture(self, model, spec, ids, batch_size, hidden: Activations) -> dict:
        """Block 0's inputs from the embeddings (everything outside the blocks but the head)."""
        front = [k for k in model.state_dict() if not k.startswith(spec.layers_path + ".")
                 and not k.startswith("lm_head.")]
        _assign(model, self.source.read(front))
        kwargs = {}
        try:
            for start in range(0, ids.shape[0], batch_size):
                h, kwargs = capture_block_inputs(model, spec, ids[start:start + batch_size], batch_size)
                if not torch.isfinite(h).all():
                    raise SwiftSVDError("NaN or Inf in the activations entering block 0 (embeddings)")
                hidden.write(start, h)
        finally:
            _drop(model, front)
            release_free_heap()
        self.check("after the embeddings")
        return kwargs

    def _block(self, model, spec, i: int, hidden: Activations, outs: Activations, kwargs, batch_size,
               on_block) -> BlockStats:
        t0 = time.perf_counter()
        layer = spec.layers(model)[i]
        prefix = f"{spec.layers_path}.{i}."
        names = list(layer.state_dict())
        layer.load_state_dict({k[len(prefix):]: v for k, v in self.source.read(prefix + k for k in names).items()},
                              strict=True, assign=True)
        grams, add = gram_accumulators(layer, spec.groups)  # the accumulation of covariance.calibrate
        cos_sum = 0.0
        with input_hooks(layer, spec.groups, add):
            for start in range(0, hidden.shape[0], batch_size):
                x = hidden.read(start, start + batch_size)
                y = block_forward(layer, x, kwargs_for(layer, kwargs))
                if not torch.isfinite(y).all():
                    raise SwiftSVDError(f"NaN or Inf in the activations leaving block {i}")
                outs.write(start, y)
                cos_sum += cosine_sum(x, y)
        for g in grams.values():
            mirror_gram(g)
        check_finite_grams(grams, spec, i)
        n_tokens = hidden.shape[0] * hidden.shape[1]
        stats = BlockStats(i, grams, n_tokens, 1.0 - cos_sum / n_tokens, time.perf_counter() - t0)
        if on_block is not None:
            on_block(layer, stats)
        _drop(layer, names)
        release_free_heap()
        return stats


# ----------------------------------------------------------------------------- pass 2: output


def lowrank_skeleton(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap the skeleton's factorized linears for weightless LowRankLinear (the output's layout)."""
    from accelerate import init_empty_weights

    for name, k in ranks.items():
        old = model.get_submodule(name)
        with init_empty_weights():
            new = LowRankLinear(old.in_features, old.out_features, int(k), bias=old.bias is not None)
        replace_module(model, name, new)


def write_weights(path: Path, model: nn.Module, spec, source, stats, ranks: dict[str, int], dtype: str,
                  errors: dict, check=lambda where: None, progress: bool = True) -> None:
    """The output's model.safetensors, non-block tensors in chunks, then block by block."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in _state_dict_for_saving(model, DTYPES[dtype]).items()}
    writer = SafetensorsWriter(path, specs, {"format": "pt", "swiftsvd_format_version": str(FORMAT_VERSION)})
    inside = spec.layers_path + "."
    try:
        for name in (k for k in specs if not k.startswith(inside)):
            for row, chunk in source.rows(name, memory_budget.COPY_CHUNK):
                writer.write(name, chunk, row)
        check("after writing the embeddings")
        n = len(spec.layers(model))
        for i in tqdm(range(n), desc="writing blocks", disable=not progress, unit="block"):
            prefix = f"{spec.layers_path}.{i}."
            keys = [k for k in specs if k.startswith(prefix)]
            factored = {k.rsplit(".", 2)[0] for k in keys if k.endswith((".A.weight", ".B.weight"))}
            for lin in sorted(factored):
                dense = source.read([f"{lin}.weight"] + ([f"{lin}.bias"] if f"{lin}.B.bias" in specs else []))
                A, B = stats.spectra[lin].factors(dense[f"{lin}.weight"], ranks[lin])
                errors[lin] = stats.spectra[lin].error(ranks[lin])
                writer.write(f"{lin}.A.weight", A.float())
                writer.write(f"{lin}.B.weight", B.float())
                if f"{lin}.B.bias" in specs:
                    writer.write(f"{lin}.B.bias", dense[f"{lin}.bias"])
                del A, B, dense
            plain = [k for k in keys if k.rsplit(".", 2)[0] not in factored]
            for name, t in source.read(plain).items():
                writer.write(name, t)
            release_free_heap()
            check(f"after writing block {i}")
    finally:
        writer.close()


# ----------------------------------------------------------------------------- the job


def _check_streamable(cfg: CompressConfig) -> None:
    if cfg.device != "cpu":
        raise SwiftSVDError(f"--device {cfg.device} is not available with layer streaming (--stream/--max-memory): "
                            "it runs on the CPU")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SwiftSVDError("layer streaming (--stream/--max-memory) runs in one process; do not start it under "
                            "torchrun")
    for flag, on in (("--sequential", cfg.sequential), ("--refit", cfg.refit),
                     ("--max-ppl-increase", cfg.max_ppl_increase is not None), ("--plots", cfg.plots),
                     ("--importance loss", cfg.importance == "loss")):
        if on:
            raise SwiftSVDError(f"{flag} is not available with layer streaming (--stream/--max-memory): it needs "
                                "the whole model in memory")


def compress_streaming(cfg: CompressConfig, max_memory: int | str | None = None) -> dict:
    """``compress`` with layer streaming; peak RSS checked against ``max_memory`` bytes. Returns the summary."""
    cfg.validate()
    _check_streamable(cfg)
    budget = memory_budget.parse_size(max_memory)
    out = Path(cfg.output)
    check_output(out, cfg.overwrite)
    t_start = time.perf_counter()
    config, tokenizer, model, source, folder = open_source(cfg.model)
    spec = spec_for(config)
    shapes = linear_shapes(model, spec)
    layer = spec.layers(model)[0]
    block_linears = {lin: tuple(layer.get_submodule(lin).weight.shape) for lin in spec.linears}
    groups = {g.name: layer.get_submodule(g.linears[0]).in_features for g in spec.groups}
    if folder is None and cfg.cache:
        cfg.cache = False  # a GGUF source has no folder fingerprint to key the cache on
    calib = build_calibration(tokenizer, cfg.calib or DEFAULT_CALIBRATION, cfg.nsamples, cfg.seqlen, cfg.seed,
                              cfg.text_field, cache=cfg.cache)
    release_free_heap()  # tokenizing leaves freed pages behind; the baseline is what stays
    plan = memory_budget.plan(budget, memory_budget.rss_bytes()[0], config, block_linears, groups,
                              sum(p.numel() for p in layer.parameters()), cfg.nsamples, cfg.seqlen,
                              cfg.batch_size, source.itemsize, linalg_pool.workers(len(block_linears), cfg.device))
    timers: dict[str, float] = {"tokenize_s": time.perf_counter() - t_start, "factorize_s": 0.0}
    choice = first_choice(model, shapes, cfg)
    workdir = None
    if plan.spill:
        (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="stream-", dir=cache_root() / "tmp"))
    run_pass = StreamingPass(source, plan, workdir)
    stats = None
    try:
        stats = gather_stats(model, spec, calib, cfg, folder, timers, run_pass=run_pass)
        ranks = select_ranks(model, shapes, cfg, stats, choice, lambda msg: print(msg, file=sys.stderr, flush=True))
        lowrank_skeleton(model, ranks)
        errors: dict[str, tuple[float, float]] = {}
        result = CompressResult(model, tokenizer, ranks, shapes, errors, list(stats.importance),
                                calib.describe(), timers, {}, choice, stats)
        with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
            save_lowrank(model, tmp, cfg.dtype, None, tokenizer, weights=False)
            t = time.perf_counter()
            write_weights(tmp / "model.safetensors", model, spec, source, stats, ranks, cfg.dtype, errors,
                          run_pass.check, cfg.progress)
            timers["build_s"] = time.perf_counter() - t
            timers["total_s"] = time.perf_counter() - t_start
            choice["stats_cache"] = ("hit" if stats.from_cache else "written" if stats.meta.get("path") else "off")
            if stats.meta.get("path"):
                choice["stats_cache_path"] = stats.meta["path"]
            peak = memory_budget.rss_bytes()[1]
            streaming = {"max_memory": budget, "peak_rss": peak, "block_peaks": run_pass.peaks,
                         "activations": "disk" if plan.spill else "ram", "plan": plan.describe()}
            manifest = build_manifest(cfg, result, str(folder or cfg.model))
            manifest["streaming"] = streaming
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        if stats is not None:
            stats.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {**summarize(cfg, result, out), "streaming": streaming}


def format_streaming_summary(s: dict) -> str:
    st = s["streaming"]
    limit = memory_budget.gib(st["max_memory"]) if st["max_memory"] else "none"
    return (format_summary(s) + f"\npeak RSS (VmHWM)  {memory_budget.gib(st['peak_rss'])} (--max-memory {limit}; "
            f"estimated {memory_budget.gib(st['plan']['planned'])}; activations in {st['activations']})")
