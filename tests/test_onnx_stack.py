"""ONNX ``--stack-a``: the A factors of q/k/v and of gate/up as one MatMul each, split by the ranks.

A tiny random Llama with every linear factorized (each at its own rank, so a wrong split shows),
exported with and without stacking: the same logits, fewer MatMuls, and a graph check that still
finds every linear's pair (and catches a wrong split).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from swiftsvd_export.backends.onnx.export import export_onnx
from swiftsvd_export.backends.onnx.graph import check_pairs, matmul_weights, ort_optimized
from swiftsvd_export.backends.onnx.runtime import OrtDecoder

from .test_onnx import HIDDEN, INTER, LAYERS, tiny_lowrank_folder

RANKS = {"self_attn.q_proj": 32, "self_attn.k_proj": 16, "self_attn.v_proj": 24, "self_attn.o_proj": 32,
         "mlp.gate_proj": 48, "mlp.up_proj": 32, "mlp.down_proj": 32}
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, 32), "self_attn.v_proj": (HIDDEN, 32),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
          "mlp.down_proj": (INTER, HIDDEN)}
FACTORS = {f"model.layers.{i}.{n}": (*SHAPES[n], k) for i in range(LAYERS) for n, k in RANKS.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_lowrank_folder(tmp_path_factory.mktemp("stack") / "lowrank", RANKS, seed=1)


def _matmuls(path: Path) -> int:
    return sum(n.op_type == "MatMul" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _prefill_and_step(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    dec = OrtDecoder(folder)
    ids = np.random.default_rng(0).integers(0, 400, size=(2, 7))
    first, cache = dec.step(ids, None, 0)
    nxt, _ = dec.step(ids[:, -1:], cache, 7)
    return first, nxt


@pytest.mark.parametrize("kv_cache", ["dense", None])  # None: the default, latent-v (v_proj factorized)
def test_stacked_graph_gives_the_same_logits_with_fewer_matmuls(folder, tmp_path, kv_cache):
    plain = export_onnx(folder, tmp_path / "plain", kv_cache=kv_cache)
    s = export_onnx(folder, tmp_path / "stacked", kv_cache=kv_cache, stack_a=True)
    assert plain["stacked_a_groups"] == 0 and s["stacked_a_groups"] == 2 * LAYERS  # q+k+v, gate+up
    assert s["kv_cache"]["layout"] == plain["kv_cache"]["layout"] == (kv_cache or "latent-v")
    # q/k/v: 3 A MatMuls become 1, gate/up: 2 become 1
    assert _matmuls(tmp_path / "plain" / "model.onnx") - _matmuls(tmp_path / "stacked" / "model.onnx") == 3 * LAYERS
    assert s["graph_check"]["exported"]["ok"] and s["graph_check"]["ort_optimized"]["ok"]
    assert s["graph_check"]["exported"]["pairs_found"] == len(FACTORS)
    # the name-free shape count sees the stacked A's; only a latent graph's per-head B_V (3-D) is not (K, N)
    shapes, plain_shapes = s["graph_check"]["exported_shapes"], plain["graph_check"]["exported_shapes"]
    assert plain_shapes["expected"] - shapes["expected"] == 3 * LAYERS  # 5 A shapes a layer become 2
    assert shapes["missing_shapes"] == plain_shapes["missing_shapes"] == ([] if kv_cache == "dense" else ["24x32"])
    shapes = {w.node: w.shape for w in matmul_weights(onnx.load(str(tmp_path / "stacked" / "model.onnx")))}
    assert shapes["/model/layers.0/self_attn/stacked_A/q_proj+k_proj+v_proj/MatMul"] == (HIDDEN, 32 + 16 + 24)
    assert shapes["/model/layers.1/mlp/stacked_A/gate_proj+up_proj/MatMul"] == (HIDDEN, 48 + 32)
    for a, b in zip(_prefill_and_step(tmp_path / "plain"), _prefill_and_step(tmp_path / "stacked")):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_stacked_quantized_graphs(folder, tmp_path):
    """int4-a8 gives the stacked A its 8 bits; int8-dynamic quantizes per output column, so the
    stacked weight quantizes exactly as its members did."""
    s = export_onnx(folder, tmp_path / "a8", quantize="int4-a8", stack_a=True)
    assert s["graph_check"]["exported"]["ok"] and s["graph_check"]["ort_optimized"]["ok"]
    bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in onnx.load(str(tmp_path / "a8" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"}
    stacked = {n: b for n, b in bits.items() if "/stacked_A/" in n}
    assert len(stacked) == 2 * LAYERS and set(stacked.values()) == {8}
    export_onnx(folder, tmp_path / "dyn", quantize="int8-dynamic", kv_cache="dense")
    s = export_onnx(folder, tmp_path / "dyn-stacked", quantize="int8-dynamic", kv_cache="dense", stack_a=True)
    assert s["graph_check"]["exported"]["ok"] and s["graph_check"]["ort_optimized"]["ok"]
    for a, b in zip(_prefill_and_step(tmp_path / "dyn"), _prefill_and_step(tmp_path / "dyn-stacked")):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)


def test_check_catches_a_wrong_split(folder, tmp_path):
    s = export_onnx(folder, tmp_path / "s", kv_cache="dense", stack_a=True, mobile=True)
    assert (tmp_path / "s" / s["mobile"]["ort_file"]).is_file() and "Split" in json.dumps(s["mobile"]["operators"])
    model = onnx.load(str(tmp_path / "s" / "model.onnx"))
    assert check_pairs(model, FACTORS).ok
    assert check_pairs(ort_optimized(tmp_path / "s" / "model.onnx"), FACTORS).ok
    split = next(i for i in model.graph.initializer if i.name.endswith("q_proj+k_proj+v_proj/split"))
    split.CopyFrom(numpy_helper.from_array(np.asarray([16, 32, 24], dtype=np.int64), split.name))  # q and k swapped
    rep = check_pairs(model, FACTORS)
    assert not rep.ok and any("stacked A split [16, 32, 24], expected the ranks [32, 16, 24]" in p
                              for p in rep.problems)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["stacked_a_groups"] == 2 * LAYERS


@pytest.mark.llamacpp
def test_stacked_a_is_importance_weighted_by_its_shared_input(folder, calib_txt, tmp_path):
    """int4 with a calibration text: the stacked A of q/k/v (and of gate/up) reads their shared input,
    whose E[x²] weights its rounding like any other 4-bit node (none is skipped)."""
    s = export_onnx(folder, tmp_path / "q", quantize="int4", imatrix_calib=calib_txt, imatrix_samples=2,
                    kv_cache="dense", stack_a=True)
    g = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    four = [n.name for n in g.graph.node if n.op_type == "MatMulNBits"
            and {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"] == 4]
    assert sum("/stacked_A/" in n for n in four) == 2 * LAYERS
    assert s["quantization"]["importance_weighted_nodes"] == len(four)
    assert s["graph_check"]["exported"]["ok"] and s["graph_check"]["ort_optimized"]["ok"]
