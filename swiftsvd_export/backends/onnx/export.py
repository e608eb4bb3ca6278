"""``export --target onnx``: a compressed (or dense) model folder -> an onnxruntime folder.

Output folder::

    model.onnx                 decoder with KV cache (input_ids, attention_mask, position_ids,
                               past_key_values.{i}.key/value -> logits, present.{i}.key/value)
    config.json, generation_config.json, tokenizer files
    model.ort, required_operators.config        (with --mobile)
    summary.json               precision, quantization, sizes, graph checks, mobile operators,
                               KV cache layout and its bytes per token

Two writers, one I/O (what ``optimum.onnxruntime.ORTModelForCausalLM`` expects, so both dense
graphs load there): ``traced`` is ``torch.onnx`` of the project's torch reference
(``latent_export.py``), the default wherever that reference models the architecture (Llama
attention); it is the only one that can write a latent cache, and its lean graph decodes SmolLM2
1.20-1.66x faster than optimum's (README, "Benchmark: onnxruntime"). ``optimum`` is optimum's
exporter (task ``text-generation-with-past``) on the in-memory low-rank model, for every other
architecture or on request. Either way a ``LowRankLinear`` lowers to two MatMuls.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ...atomic import atomic_dir, check_output
from ...architectures import spec_for
from ...errors import SwiftSVDError
from ...latent_kv import LAYOUTS, check_attention, check_layout, default_layout, kv_bytes_per_token
from .cli import GRAPHS, PRECISIONS, QUANTIZE
from .graph import PairReport, check_pairs, initializer_bytes, onnx_prefix, ort_optimized, shape_counts
from .latent_export import METADATA_KEY, check_latent_pairs, export_traced_graph, traced_metadata, write_metadata
from .quantize import (DEFAULT_ACCURACY_LEVEL, check_accuracy_level, check_block_size, quantize_int8_dynamic,
                       quantize_nbits, save_model, to_fp16, weighted_q4_quantizer)
from .stack import stack_a_factors

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
NBITS_MODES = ("int8", "int4", "int4-a8")  # the --quantize modes written as MatMulNBits


def validate_options(precision: str, quantize: str, block_size: int | None, kv_cache: str = "dense",
                     graph: str | None = None, accuracy_level: int | None = None, attention: str = "plain") -> None:
    if kv_cache not in LAYOUTS:
        raise SwiftSVDError(f"unknown KV cache layout {kv_cache!r}; choose one of {', '.join(LAYOUTS)}")
    check_graph(graph, kv_cache)
    check_attention(attention, kv_cache)
    if precision not in PRECISIONS:
        raise SwiftSVDError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if quantize not in QUANTIZE:
        raise SwiftSVDError(f"unknown quantization mode {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if quantize != "none" and precision != "fp32":
        raise SwiftSVDError(f"--quantize {quantize} works on the fp32 graph; drop --precision {precision}")
    for flag, value in (("--block-size", block_size), ("--accuracy-level", accuracy_level)):
        if value is not None and quantize not in NBITS_MODES:
            raise SwiftSVDError(f"{flag} only applies to --quantize int8, int4 or int4-a8")
    check_block_size(block_size)
    check_accuracy_level(accuracy_level)


def check_graph(graph: str | None, kv_cache: str) -> None:
    """``graph`` is a known writer (or None: picked per architecture) that can write ``kv_cache``."""
    if graph is not None and graph not in GRAPHS:
        raise SwiftSVDError(f"unknown ONNX graph writer {graph!r}; choose one of {', '.join(GRAPHS)}")
    if graph == "optimum" and kv_cache != "dense":
        raise SwiftSVDError(f"a {kv_cache} cache needs the traced graph; optimum's exporter writes a dense cache only")


def check_model_folder(model_dir: str | Path) -> Path:
    from ...models import _EMBEDDED

    if str(model_dir) in _EMBEDDED:
        return Path(str(model_dir))
    path = Path(model_dir)
    if not path.exists():
        raise SwiftSVDError(f"{path}: no such model folder")
    if not path.is_dir():
        raise SwiftSVDError(f"{path}: not a model folder (give a compressed or transformers folder)")
    if not (path / "config.json").is_file():
        raise SwiftSVDError(f"{path}: not a model folder (no config.json); give a folder written by "
                            "`swiftsvd-export compress` or a dense transformers folder")
    if not any(path.glob("*.safetensors")):
        raise SwiftSVDError(f"{path}: not a model folder (no .safetensors weights)")
    return path


def factor_shapes(model) -> dict[str, tuple[int, int, int]]:
    from ...lowrank import LowRankLinear

    return {n: (m.in_features, m.out_features, m.rank)
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def export_graph(model, out_dir: Path, opset: int | None = None) -> Path:
    """Run optimum's exporter on the in-memory model; returns the fp32 ``model.onnx``."""
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_export_from_model(model, out_dir, task=TASK, opset=opset, do_validation=False)
        except SwiftSVDError:
            raise
        except Exception as e:  # the exporter raises many types; report one line
            raise SwiftSVDError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    path = out_dir / "model.onnx"
    if not path.is_file():
        raise SwiftSVDError(f"ONNX export wrote no model.onnx (got {sorted(p.name for p in out_dir.iterdir())})")
    return path


def fuse_tied_head(model) -> int:
    """``MatMul(x, Transpose(E))`` -> ``FusedMatMul(x, E, transB=1)`` for a tied output head.

    The exporter writes the tied lm_head as a Transpose of the embedding; onnxruntime would
    constant-fold it into a second, transposed copy of the embedding (in memory and in the
    ``.ort`` file). The contrib op ``FusedMatMul`` reads the embedding as stored. Returns the
    number of nodes rewritten.
    """
    import onnx

    g = model.graph
    inits = {i.name for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in g.output}
    rewritten = 0
    for t in list(g.node):
        if t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        users = consumers.get(t.output[0], [])
        if perm != [1, 0] or t.output[0] in graph_outputs or not users or any(
                u.op_type != "MatMul" or list(u.input).index(t.output[0]) != 1 or u.input[0] == t.output[0]
                for u in users):
            continue
        for u in users:
            fused = onnx.helper.make_node("FusedMatMul", [u.input[0], t.input[0]], list(u.output),
                                          name=u.name, domain="com.microsoft", transA=0, transB=1, alpha=1.0)
            idx = list(g.node).index(u)
            g.node.remove(u)
            g.node.insert(idx, fused)
            rewritten += 1
        g.node.remove(t)
    rewritten += _fuse_folded_head(model, consumers)
    if rewritten and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return rewritten


def _fuse_folded_head(model, consumers: dict) -> int:
    """The same rewrite when the exporter already folded the Transpose (Gemma 3): a MatMul whose
    weight initializer equals the transpose of an embedding table (read by a Gather) reads the
    table itself, and the folded copy is dropped."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits}
    rewritten = 0
    for name in tables:
        table = inits[name]
        for u in list(g.node):
            w = u.input[1] if u.op_type == "MatMul" and len(u.input) == 2 else None
            if w not in inits or w in tables or list(inits[w].dims) != list(reversed(table.dims)):
                continue
            if any(c is not u for c in consumers.get(w, [])) or not np.array_equal(
                    numpy_helper.to_array(inits[w]), numpy_helper.to_array(table).T):
                continue
            fused = onnx.helper.make_node("FusedMatMul", [u.input[0], name], list(u.output), name=u.name,
                                          domain="com.microsoft", transA=0, transB=1, alpha=1.0)
            g.node.insert(list(g.node).index(u), fused)
            g.node.remove(u)
            g.initializer.remove(inits.pop(w))
            rewritten += 1
    return rewritten


def _check(graph, factors: dict[str, tuple[int, int, int]], kv_cache: str, config) -> PairReport:
    if kv_cache == "dense":
        return check_pairs(graph, factors)
    return check_latent_pairs(graph, factors, config)


def _files_size(folder: Path, names) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def export_onnx(model_dir: str | Path, output: str | Path, precision: str = "fp32", quantize: str = "none",
                block_size: int | None = None, mobile: bool = False, overwrite: bool = False,
                opset: int | None = None, model=None, tokenizer=None, kv_cache: str | None = "dense",
                graph: str | None = None, imatrix_calib: str | Path | None = None, imatrix_samples: int = 16,
                text_field: str = "text", accuracy_level: int | None = None, stack_a: bool = False,
                attention: str = "plain") -> dict:
    """Export ``model_dir`` to the folder ``output``; returns the summary written to summary.json.

    ``kv_cache`` picks the cache layout (``latent_kv.LAYOUTS``); a latent layout on a model whose
    cached projections are not factorized in every layer is refused, never exported dense. None
    (the CLI's default) picks ``latent_kv.default_layout``: latent-v for a model whose v_proj is
    factorized everywhere, dense with ``graph="optimum"`` (its exporter writes no other). The API
    default stays ``dense``, the cache ``ORTModelForCausalLM`` loads.
    ``graph`` picks the writer (``GRAPHS``); None: ``traced`` where the torch reference models the
    architecture (``spec.latent_kv``), else ``optimum``.

    ``model``/``tokenizer`` may be passed to skip loading (tests, benchmarks); ``model_dir`` is
    then only recorded.
    ``imatrix_calib``: with int4 / int4-a8, a calibration text whose E[x²] per input channel weights
    the 4-bit rounding (``quantize.weight_q4_nodes``).
    ``accuracy_level``: MatMulNBits' compute (``quantize.ACCURACY_LEVELS``; None: 4, int8 activations).
    ``stack_a``: one MatMul for the A factors of the linears that read one input (q/k/v, gate/up),
    split by their ranks (``stack.py``).
    ``attention``: ``latent_kv.ATTENTIONS``; ``gqa`` (traced graph, dense cache; None for
    ``kv_cache`` then means dense) writes each layer's attention as one GroupQueryAttention.
    """
    import onnx

    if attention == "gqa" and kv_cache is None:
        kv_cache = "dense"
    validate_options(precision, quantize, block_size, kv_cache or "dense", graph, accuracy_level, attention)
    output = Path(output)
    check_output(output, overwrite)
    t0 = time.time()
    if model is None:
        from ...models import load_model

        src = check_model_folder(model_dir)
        model, tokenizer, _folder = load_model(str(src))
    model = model.float().eval()
    factors = factor_shapes(model)
    importance = quantizer = None
    if imatrix_calib is not None and quantize in ("int4", "int4-a8"):
        from ...channel_importance import measure_model

        quantizer = weighted_q4_quantizer(block_size)
        importance = measure_model(model, tokenizer, imatrix_calib, imatrix_samples, text_field=text_field)
    config = model.config
    ranks = {n: k for n, (_, _, k) in factors.items()}
    if kv_cache is None:
        kv_cache = "dense" if graph == "optimum" else default_layout(ranks, config.num_hidden_layers,
                                                                      config.model_type)
    check_layout(kv_cache, config, ranks)
    if graph is None:
        graph = "traced" if spec_for(config).latent_kv else "optimum"
    if attention == "gqa" and graph != "traced":
        raise SwiftSVDError(f"--attention gqa is written by the traced graph, which models Llama attention "
                            f"only; model_type {config.model_type!r} exports through optimum")
    own_graph = graph == "traced"  # traced from the torch reference, not optimum's exporter

    with atomic_dir(output, overwrite=overwrite) as tmp:
        raw_dir = tmp / ".raw"
        if not own_graph:
            raw = export_graph(model, raw_dir, opset=opset)
        else:
            raw = export_traced_graph(model, raw_dir, kv_cache, opset=opset, attention=attention)
            config.save_pretrained(raw_dir)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(raw_dir)
        for name in ("config.json", "generation_config.json"):
            if (raw_dir / name).is_file():
                shutil.move(str(raw_dir / name), tmp / name)
        final = tmp / "model.onnx"
        quant_info: dict = {"mode": "none"}
        proto = onnx.load(str(raw))
        fused_head = fuse_tied_head(proto)
        stacked = stack_a_factors(proto) if stack_a else 0
        if fused_head or stacked:
            for p in raw_dir.iterdir():
                if p.name.startswith("model.onnx"):
                    p.unlink()
            save_model(proto, raw)
        del proto
        if quantize == "int8-dynamic":
            quant_info = quantize_int8_dynamic(raw, final)
        elif quantize in NBITS_MODES:
            quant_info = quantize_nbits(raw, final, bits=int(quantize[3]), block_size=block_size,
                                        a_bits=8 if quantize == "int4-a8" else None,
                                        a_prefixes=tuple(onnx_prefix(m) + "A/" for m in factors),
                                        importance=importance, quantizer=quantizer,
                                        accuracy_level=accuracy_level or DEFAULT_ACCURACY_LEVEL)
        elif precision == "fp16":
            save_model(to_fp16(onnx.load(str(raw))), final)
        else:
            for p in raw_dir.iterdir():
                if p.name.startswith("model.onnx"):
                    shutil.move(str(p), tmp / p.name)
        shutil.rmtree(raw_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        graph = onnx.load(str(final), load_external_data=False)
        metadata = traced_metadata(kv_cache, attention)
        if own_graph and not metadata.items() <= {p.key: p.value for p in graph.metadata_props}.items():
            graph = write_metadata(final, metadata)  # a quantizer or converter dropped the metadata
        before = _check(graph, factors, kv_cache, config)
        before_shapes = shape_counts(graph, factors)
        after_model = ort_optimized(final)
        after = _check(after_model, factors, kv_cache, config)
        if not before.ok or not after.ok:
            which = "exported" if not before.ok else "ORT-optimized"
            probs = (before if not before.ok else after).problems
            raise SwiftSVDError(f"graph check failed on the {which} graph: {probs[0]}"
                                + (f" (+{len(probs) - 1} more)" if len(probs) > 1 else ""))
        weights_dtype = "fp16" if precision == "fp16" else "fp32"
        if quantize == "none" and factors and set(before.weight_dtypes) != {weights_dtype}:
            raise SwiftSVDError(f"factor weights stored as {before.weight_dtypes}, expected {weights_dtype}")

        onnx_files = sorted(p.name for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        summary = {
            "format": "swiftsvd-onnx", "format_version": 1,
            "source": str(model_dir), "task": TASK,
            "graph_from": "torch-reference" if own_graph else "optimum",
            "model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "precision": precision, "quantization": quant_info,
            "lowrank": bool(factors), "factorized_linears": len(factors),
            "tied_head_as_fusedmatmul": bool(fused_head), "stacked_a_groups": stacked,
            "attention": attention,
            "ranks": ranks,
            "kv_cache": {"layout": kv_cache, "metadata_key": METADATA_KEY,
                         "bytes_per_token_fp32": kv_bytes_per_token(config, ranks, kv_cache),
                         "dense_bytes_per_token_fp32": kv_bytes_per_token(config, ranks, "dense")},
            "files": {"onnx": onnx_files, "onnx_bytes": _files_size(tmp, onnx_files)},
            "initializer_bytes": initializer_bytes(graph),
            "graph_check": {"exported": before.to_dict(), "exported_shapes": before_shapes,
                            "ort_optimized": after.to_dict()},
            "io": {"inputs": [i.name for i in graph.graph.input],
                   "outputs": [o.name for o in graph.graph.output]},
        }
        if mobile:
            from .mobile import convert_to_ort

            summary["mobile"] = convert_to_ort(final, tmp)
        summary["export_seconds"] = round(time.time() - t0, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s (%s, quantize=%s, %.1f MB, %d factorized linears as MatMul pairs%s)", output,
             precision, quantize, summary["files"]["onnx_bytes"] / 1e6, len(factors),
             f", .ort {summary['mobile']['ort_bytes'] / 1e6:.1f} MB" if mobile else "")
    return summary
