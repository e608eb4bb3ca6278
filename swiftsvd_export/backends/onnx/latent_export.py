"""The traced decoder graph: ``torch.onnx.export`` of ``latent_kv.LatentLlama``.

optimum sizes past/present tensors as (batch, kv_heads, seq, head_dim) and cannot express a
cache of latents, so the latent graphs are traced from the torch reference itself (a dense
cache can be traced too, as a like-for-like baseline). I/O, with ``L`` the layer index::

    input_ids (batch, seq)             attention_mask (batch, past_seq + seq)
    position_ids (batch, seq)          past_position_ids (batch, past_seq)      [latent-kv only]
    past_key_values.L.key / .value  -> present.L.key / .value
    logits (batch, seq, vocab)

with the cache shapes of ``latent_kv.cache_shapes``: a latent is (batch, 1, seq, rank), shared by
all heads; a dense entry is (batch, kv_heads, seq, head_dim). The layout is stored in the model's
metadata (``swiftsvd.kv_cache``) so the runtime needs no side file; so is ``swiftsvd.attention``
= ``gqa`` for a graph whose attention is onnxruntime's GroupQueryAttention (``latent_kv.ATTENTIONS``):
the same I/O, and a runtime may pass one preallocated buffer per cache entry as both past and
present, which the op then appends to in place.

Graph check: every factorized linear stays two MatMuls. k_proj under ``latent-kv`` still has its
A and B MatMuls (B now reads the cached latents of all positions), checked by ``check_pairs``;
v_proj under a latent layout has its A MatMul (in, k) and one batched MatMul under
``v_proj/B/`` whose weight is B_V as (kv_heads, k, head_dim).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from ...errors import SwiftSVDError
from ...latent_kv import LatentLlama, head_dim
from .graph import DTYPE_NAMES, PairReport, a_factor, check_pairs, matmul_weights, onnx_prefix, stack_splits
from .quantize import save_model
from .runtime import ATTENTION_KEY
from .runtime import LAYOUT_KEY as METADATA_KEY

OPSET = 17


def io_names(latent: LatentLlama) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    if latent.layout == "latent-kv":
        inputs.append("past_position_ids")
    inputs += [f"past_key_values.{n}" for n in latent.cache_names()]
    return inputs, ["logits"] + [f"present.{n}" for n in latent.cache_names()]


def export_traced_graph(model, out_dir: Path, layout: str, opset: int | None = None,
                        attention: str = "plain") -> Path:
    """Trace ``LatentLlama(model, layout, attention)`` into ``out_dir/model.onnx`` (fp32) with the
    layout (and a ``gqa`` attention) in its metadata."""
    latent = LatentLlama(model, layout, attention).eval()
    batch, seq, past = 2, 3, 4  # sizes of the trace; every one of them is a dynamic axis
    cache = [torch.randn(batch, h, past, w) for kv in latent.shapes for h, w in kv]
    args: list[torch.Tensor] = [torch.randint(0, model.config.vocab_size, (batch, seq)),
                                torch.ones(batch, past + seq, dtype=torch.long),
                                torch.arange(past, past + seq).expand(batch, seq).contiguous()]
    if layout == "latent-kv":
        args.append(torch.arange(past).expand(batch, past).contiguous())
    inputs, outputs = io_names(latent)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "past_position_ids": {0: "batch_size", 1: "past_sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs if n.startswith("past_key")})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs if n.startswith("present")})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(latent, tuple(args + cache), str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
                              opset_version=opset or OPSET, do_constant_folding=True, dynamo=False,
                              custom_opsets={"com.microsoft": 1} if attention == "gqa" else None)
        except Exception as e:  # the tracer raises many types; report one line
            raise SwiftSVDError(f"ONNX export of the {layout} graph failed: {type(e).__name__}: {e}") from e
    proto = onnx.load(str(path))
    unfold_tied_head(proto)
    fill_optional_inputs(proto)
    set_metadata(proto, traced_metadata(layout, attention))
    save_model(proto, path)
    return path


GQA_BIAS_INPUT = 10  # GroupQueryAttention's attention_bias, after cos_cache, sin_cache, position_ids


def fill_optional_inputs(model: onnx.ModelProto) -> int:
    """Give each traced GroupQueryAttention node its attention_bias at input 10: the tracer wrote
    it right after total_sequence_length, with no way to leave the optional inputs between empty."""
    n = 0
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) == 8:
            bias = node.input[7]
            del node.input[7]
            node.input.extend([""] * (GQA_BIAS_INPUT - 7) + [bias])
            n += 1
    return n


def unfold_tied_head(model: onnx.ModelProto) -> int:
    """Turn a constant-folded copy of the tied embedding, Eᵀ, back into ``Transpose(E)``.

    The tracer folds the tied lm_head into a second, transposed embedding initializer; with the
    ``Transpose`` restored, ``export.fuse_tied_head`` makes it a FusedMatMul that reads E as
    stored, as it does for optimum's graph. Returns the number of heads restored.
    """
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = {n.input[0] for n in g.node if n.op_type == "Gather" and n.input[0] in inits}
    restore: list[tuple[onnx.NodeProto, str, str]] = []  # (MatMul, folded initializer, embedding)
    for node in g.node:
        folded = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if folded is None:
            continue
        for name in tables:
            table = inits[name]
            if tuple(table.dims) == tuple(reversed(folded.dims)) and np.array_equal(
                    numpy_helper.to_array(folded), numpy_helper.to_array(table).T):
                restore.append((node, folded.name, name))
                break
    for node, folded, table in restore:
        del g.initializer[[i.name for i in g.initializer].index(folded)]
        g.node.insert(0, onnx.helper.make_node("Transpose", [table], [folded], perm=[1, 0],
                                               name=f"{node.name}/tied_transpose"))
    return len(restore)


def traced_metadata(layout: str, attention: str = "plain") -> dict[str, str]:
    """What a traced graph records for the runtime: its cache layout, and a ``gqa`` attention."""
    return {METADATA_KEY: layout, **({ATTENTION_KEY: "gqa"} if attention == "gqa" else {})}


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Record ``props`` in the model metadata (replacing earlier entries of those keys)."""
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})


def write_metadata(path: Path, props: dict[str, str]) -> onnx.ModelProto:
    """Write ``props`` into the metadata of the model file at ``path``; returns the graph without weights."""
    model = onnx.load(str(path))
    set_metadata(model, props)
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    save_model(model, path)
    return onnx.load(str(path), load_external_data=False)


def _weight(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The initializer a MatMul reads as its weight (input 1), if it is one."""
    name = node.input[1] if len(node.input) > 1 else None
    return next((i for i in model.graph.initializer if i.name == name), None)


def check_latent_pairs(model: onnx.ModelProto, factors: dict[str, tuple[int, int, int]], config) -> PairReport:
    """``check_pairs`` for a latent graph: v_proj's B is one batched MatMul on (kv_heads, k, head_dim)."""
    v_names = {n for n in factors if n.endswith(".self_attn.v_proj")}
    report = check_pairs(model, factors, names=set(factors) - v_names)
    report.n_factorized = len(factors)
    kv_heads, hd = int(config.num_key_value_heads), head_dim(config)
    weights = matmul_weights(model)
    splits = stack_splits(model)
    nodes = {n.name: n for n in model.graph.node}
    for name in sorted(v_names):
        fin, fout, k = factors[name]
        prefix = onnx_prefix(name)
        # MatMuls under v_proj with a constant weight (softmax(QKᵀ)·latent also runs under v_proj)
        mine = [w for w in weights if prefix in w.node
                and (w.shape is not None or _weight(model, nodes[w.node]) is not None)]
        a, a_shape, a_problem = a_factor(weights, name, factors, splits)
        a = [w for w in a if w.shape == a_shape]
        b = [init for w in mine if f"{prefix}B/" in w.node and w.op == "MatMul"
             and (init := _weight(model, nodes[w.node])) is not None and tuple(init.dims) == (kv_heads, k, hd)]
        if len(a) == 1 and len(b) == 1 and len(mine) + (a[0] not in mine) == 2 and not a_problem:
            report.n_pairs_found += 1
            for dtype in (a[0].dtype, DTYPE_NAMES.get(b[0].data_type, str(b[0].data_type))):
                report.weight_dtypes[dtype or "?"] = report.weight_dtypes.get(dtype or "?", 0) + 1
        else:
            report.problems.append(a_problem or f"{name}: expected an A MatMul {a_shape} and a per-head B MatMul "
                                   f"{(kv_heads, k, hd)}, found {[(w.node, w.shape) for w in mine]}")
    report.ok = not report.problems
    return report
