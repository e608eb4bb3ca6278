"""ONNX target: paired-MatMul graphs, KV cache, parity, quantization, mobile, bad input.

Everything runs on a tiny random Llama made here (GQA, tied embeddings) with a tiny BPE
tokenizer trained here, so no model download or cache is needed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from swiftsvd_export.backends.onnx import cli as onnx_cli
from swiftsvd_export.backends.onnx.export import export_onnx
from swiftsvd_export.backends.onnx.graph import MATMUL_OPS, check_pairs, matmul_weights, ort_optimized
from swiftsvd_export.backends.onnx.parity import compare_logits, parity, torch_logits
from swiftsvd_export.backends.onnx.runtime import OrtDecoder, encode, load_tokenizer
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.lowrank import save_lowrank
from swiftsvd_export.models import load_model

from .conftest import lowrank_llama

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 160, 2, 4, 2
# Ranks: 32 and 48 are multiples of 16 (int4-quantizable B factors); 24 is not (stays fp32 in int4).
RANKS = {"self_attn.q_proj": 32, "self_attn.o_proj": 24, "mlp.up_proj": 48, "mlp.down_proj": 32}
TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a small village "
        "by the sea. def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")
PROMPTS = ["The quick brown fox", "Once upon a time there was", "def fibonacci(n):"]


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def tiny_lowrank_folder(folder: Path, ranks: dict[str, int], seed: int = 0) -> Path:
    """A tiny random Llama (GQA, tied embeddings) with ``ranks`` factorized, saved with its tokenizer."""
    from transformers import LlamaConfig

    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_lowrank(lowrank_llama(cfg, ranks), folder, dtype="fp32", tokenizer=tok)
    return folder


@pytest.fixture(scope="module")
def lowrank_dir(tmp_path_factory) -> Path:
    return tiny_lowrank_folder(tmp_path_factory.mktemp("tiny") / "lowrank", RANKS)


@pytest.fixture(scope="module")
def torch_model(lowrank_dir):
    model, tok, _ = load_model(str(lowrank_dir))
    return model, tok


def expected_factors() -> dict[str, tuple[int, int, int]]:
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.up_proj": (HIDDEN, INTER), "mlp.down_proj": (INTER, HIDDEN)}
    return {f"model.layers.{i}.{n}": (*shapes[n], k) for i in range(LAYERS) for n, k in RANKS.items()}


@pytest.fixture(scope="module")
def exports(lowrank_dir, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, kw in {"fp32": dict(mobile=True), "fp16": dict(precision="fp16"),
                     "int8": dict(quantize="int8"), "int4": dict(quantize="int4"),
                     "int4-a8": dict(quantize="int4-a8"),
                     "int8-dynamic": dict(quantize="int8-dynamic")}.items():
        export_onnx(lowrank_dir, base / name, **kw)
        out[name] = base / name
    return out


def prompt_ids(tok) -> list[list[int]]:
    return [tok(p)["input_ids"] for p in PROMPTS]


# --- graph checks ----------------------------------------------------------------------------

def _pairs_by_shape(model: onnx.ModelProto) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for w in matmul_weights(model):
        if w.shape is not None:
            counts[w.shape] = counts.get(w.shape, 0) + 1
    return counts


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int4"])
def test_two_matmuls_per_factorized_linear_before_and_after_ort_optimization(exports, variant, tmp_path):
    factors = expected_factors()
    graph = onnx.load(str(exports[variant] / "model.onnx"))
    optimized = ort_optimized(exports[variant] / "model.onnx", tmp_path / "opt.onnx")
    for g in (graph, optimized):
        rep = check_pairs(g, factors)
        assert rep.ok, rep.problems
        assert rep.n_pairs_found == len(factors) == LAYERS * len(RANKS)
        # name-free cross-check: each factor shape appears as many times as the ranks say,
        # and no factorized linear's dense shape (in, out) is present for the q/o/up/down projections.
        by_shape = _pairs_by_shape(g)
        for (fin, fout, k) in set(factors.values()):
            n = sum(1 for v in factors.values() if v == (fin, fout, k))
            assert by_shape.get((fin, k), 0) >= n and by_shape.get((k, fout), 0) >= n
        assert by_shape.get((HIDDEN, INTER), 0) == LAYERS  # gate_proj only (up_proj is factorized)
        assert by_shape.get((INTER, HIDDEN), 0) == 0       # down_proj factorized in every layer
    # MatMul-family nodes with a weight: 2 per factor pair + dense k/v/gate per layer + lm_head (tied)
    weighted = [w for w in matmul_weights(graph) if w.shape is not None]
    assert len(weighted) == LAYERS * (2 * len(RANKS) + 3) + 1
    summary = json.loads((exports[variant] / "summary.json").read_text())
    assert summary["graph_check"]["exported"]["ok"] and summary["graph_check"]["ort_optimized"]["ok"]


def test_weights_stored_at_chosen_precision(exports):
    g32 = onnx.load(str(exports["fp32"] / "model.onnx"))
    g16 = onnx.load(str(exports["fp16"] / "model.onnx"))
    assert set(check_pairs(g32, expected_factors()).weight_dtypes) == {"fp32"}
    assert set(check_pairs(g16, expected_factors()).weight_dtypes) == {"fp16"}
    big16 = [i for i in g16.graph.initializer if len(i.dims) == 2]
    assert big16 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big16)
    w32 = json.loads((exports["fp32"] / "summary.json").read_text())["initializer_bytes"]
    w16 = json.loads((exports["fp16"] / "summary.json").read_text())["initializer_bytes"]
    assert w16.get("fp16", 0) == w32["fp32"] // 2 and w16.get("fp32", 0) == 0  # stored as fp16, not expanded
    size32 = (exports["fp32"] / "model.onnx").stat().st_size
    size16 = (exports["fp16"] / "model.onnx").stat().st_size
    assert size16 < 0.65 * size32
    # KV cache and logits stay fp32 at the graph boundary
    assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in g16.graph.input)


def test_quantized_graphs_use_the_quantized_ops(exports):
    ops8 = {n.op_type for n in onnx.load(str(exports["int8-dynamic"] / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops8
    for bits in (8, 4):
        g = onnx.load(str(exports[f"int{bits}"] / "model.onnx"))
        nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
        assert nbits
        for n in nbits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["K"] % attrs["block_size"] == 0 and attrs["bits"] == bits
    s4 = json.loads((exports["int4"] / "summary.json").read_text())
    left = {d["node"] for d in s4["quantization"]["left_fp32"]}
    # rank 24 (o_proj B factor) is a multiple of no allowed block size: left in fp32 and listed
    assert left == {f"/model/layers.{i}/self_attn/o_proj/B/MatMul" for i in range(LAYERS)}
    for v in ("int8", "int4", "int8-dynamic"):
        assert (exports[v] / "model.onnx").stat().st_size < (exports["fp32"] / "model.onnx").stat().st_size


def test_int4_with_8_bit_a_factors(exports):
    """int4-a8: every A factor is an 8-bit MatMulNBits, every other quantized MatMul 4-bit."""
    g = onnx.load(str(exports["int4-a8"] / "model.onnx"))
    bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"]
            for n in g.graph.node if n.op_type == "MatMulNBits"}
    a_bits = {name: b for name, b in bits.items() if "/A/" in name}
    assert len(a_bits) == LAYERS * len(RANKS) and set(a_bits.values()) == {8}
    assert {b for name, b in bits.items() if "/A/" not in name} == {4}
    assert check_pairs(g, expected_factors()).ok
    size = {v: (exports[v] / "model.onnx").stat().st_size for v in ("int4", "int4-a8", "int8")}
    assert size["int4"] < size["int4-a8"] < size["int8"]
    q = json.loads((exports["int4-a8"] / "summary.json").read_text())["quantization"]
    assert (q["mode"], q["bits"], q["a_bits"]) == ("int4-a8", 4, 8)
    from swiftsvd_export.validation.artifacts import discover

    assert [a.variant for a in discover([exports["int4-a8"]])] == ["int4+int8"]  # what the report prints


def test_nbits_accuracy_level(exports, lowrank_dir, torch_model, tmp_path):
    """MatMulNBits computes with int8 activations (accuracy level 4) unless asked for level 1: at 1
    onnxruntime has no 8-bit kernel and dequantizes every weight per call (README, "accuracy
    level"). Level 1 keeps the activations fp32, so it lands closer to the fp32 graph."""
    from swiftsvd_export.backends.onnx.runtime import OrtDecoder

    def levels(folder):
        g = onnx.load(str(folder / "model.onnx"))
        return {onnx.helper.get_attribute_value(a) for n in g.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "accuracy_level"}

    s1 = export_onnx(lowrank_dir, tmp_path / "int8-acc1", quantize="int8", accuracy_level=1)
    assert levels(exports["int8"]) == {4} and levels(exports["int4-a8"]) == {4} and levels(tmp_path / "int8-acc1") == {1}
    assert s1["quantization"]["accuracy_level"] == 1
    assert json.loads((exports["int8"] / "summary.json").read_text())["quantization"]["accuracy_level"] == 4
    ids = np.asarray([prompt_ids(torch_model[1])[0]])
    ref = OrtDecoder(exports["fp32"]).logits(ids)
    err = {v: np.abs(OrtDecoder(f).logits(ids) - ref).max() for v, f in
           (("4", exports["int8"]), ("1", tmp_path / "int8-acc1"))}
    assert err["1"] < err["4"], err


@pytest.mark.llamacpp
def test_int4_weighted_by_a_calibration_text(lowrank_dir, torch_model, exports, calib_txt, tmp_path):
    """With a calibration text, every 4-bit MatMulNBits is ggml's importance-weighted Q4_0 of its weight
    (blocks of 32, repacked; tests/test_gguf_importance.py checks the repacking), recorded in the
    summary; the graph still matches torch. A block size other than Q4_0's is refused before any work."""
    model, tok = torch_model
    s = export_onnx(lowrank_dir, tmp_path / "q", quantize="int4-a8", imatrix_calib=calib_txt, imatrix_samples=2)
    q = s["quantization"]
    g = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    four = [n for n in g.graph.node if n.op_type == "MatMulNBits"
            and {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["bits"] == 4]
    assert q["importance_weighted_nodes"] == len(four) > 0  # every 4-bit node reads a block input
    assert q["importance"].endswith(f"tokens of {calib_txt.name}")
    assert json.loads((exports["int4-a8"] / "summary.json").read_text())["quantization"]["importance_weighted_nodes"] == 0
    r = parity(model, tmp_path / "q", prompt_ids(tok), gen_tokens=8, max_abs_logit=None)
    assert np.isfinite(r["kl_mean"]) and r["top1_agree"] > 0.5
    with pytest.raises(SwiftSVDError, match="blocks of 32"):
        export_onnx(lowrank_dir, tmp_path / "b", quantize="int4", block_size=64, imatrix_calib=calib_txt)
    assert not (tmp_path / "b").exists()


# --- parity and KV cache ---------------------------------------------------------------------

def test_fp32_parity_with_torch(exports, torch_model):
    model, tok = torch_model
    r = parity(model, exports["fp32"], prompt_ids(tok), gen_tokens=64)
    assert r["max_abs_logit"] <= 1e-3, r
    assert r["top1_agree"] == 1.0
    assert r["kl_mean"] < 1e-6
    assert r["greedy_identical"], r["greedy_first_mismatch"]
    assert r["passed"]


@pytest.mark.parametrize("variant", ["fp16", "int8", "int4", "int4-a8", "int8-dynamic"])
def test_lower_precision_figures(exports, torch_model, variant):
    model, tok = torch_model
    r = parity(model, exports[variant], prompt_ids(tok), gen_tokens=8, max_abs_logit=None)
    assert "passed" not in r  # figures only
    assert np.isfinite(r["max_abs_logit"]) and np.isfinite(r["kl_mean"])
    assert r["top1_agree"] > 0.5


def test_prefill_then_decode_equals_full_recompute(exports, torch_model):
    _, tok = torch_model
    dec = OrtDecoder(exports["fp32"], threads=1)
    ids = np.asarray([tok(PROMPTS[1] + " " + PROMPTS[0])["input_ids"]])
    full = dec.logits(ids)[0]
    n0 = 3
    logits, cache = dec.step(ids[:, :n0], None, 0)
    steps = [logits[0]]
    for t in range(n0, ids.shape[1]):
        logits, cache = dec.step(ids[:, t:t + 1], cache, t)
        steps.append(logits[0])
        assert cache[0].shape()[2] == t + 1  # present grows by one per step
    inc = np.concatenate(steps)
    assert inc.shape == full.shape
    assert np.abs(inc - full).max() < 1e-4


def test_own_loop_greedy_and_sampled(exports, torch_model):
    _, tok = torch_model
    dec = OrtDecoder(exports["fp32"], threads=1)
    ids = tok(PROMPTS[0])["input_ids"]
    g1 = dec.generate(ids, 12, stop_at_eos=False)
    g2 = dec.generate(ids, 12, stop_at_eos=False)
    assert g1["tokens"] == g2["tokens"] and len(g1["tokens"]) == 12
    s1 = dec.generate(ids, 12, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    s2 = dec.generate(ids, 12, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    assert s1["tokens"] == s2["tokens"]
    assert g1["decode_tok_s"] > 0 and g1["prefill_tok_s"] > 0


def test_optimum_loader_round_trip(exports, torch_model):
    from optimum.onnxruntime import ORTModelForCausalLM

    model, tok = torch_model
    ort_model = ORTModelForCausalLM.from_pretrained(exports["fp32"], use_cache=True)
    ids = torch.tensor([tok(PROMPTS[2])["input_ids"]])
    logits = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
    assert compare_logits(torch_logits(model, ids[0].tolist()), logits)["max_abs_logit"] < 1e-3
    out = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                         do_sample=False)
    assert out[0].tolist() == ref[0].tolist()
    mine = OrtDecoder(exports["fp32"]).generate(ids[0].tolist(), 16, stop_at_eos=False)["tokens"]
    assert out[0, ids.shape[1]:].tolist()[:1] == mine[:1]


def test_default_graph_is_traced_and_optimum_graph_on_request(exports, lowrank_dir, torch_model, tmp_path):
    """A Llama exports through the torch reference by default (the lean graph); optimum's exporter
    on request. Both load in ORTModelForCausalLM and match torch (the default one: the test above)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    assert json.loads((exports["fp32"] / "summary.json").read_text())["graph_from"] == "torch-reference"
    s = export_onnx(lowrank_dir, tmp_path / "optimum", graph="optimum")
    assert s["graph_from"] == "optimum" and s["graph_check"]["ort_optimized"]["ok"]
    model, tok = torch_model
    ids = torch.tensor([tok(PROMPTS[2])["input_ids"]])
    logits = ORTModelForCausalLM.from_pretrained(tmp_path / "optimum", use_cache=True)(
        input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy()
    assert compare_logits(torch_logits(model, ids[0].tolist()), logits)["max_abs_logit"] < 1e-3
    with pytest.raises(SwiftSVDError, match="unknown ONNX graph writer 'tf2onnx'"):
        export_onnx(lowrank_dir, tmp_path / "o", graph="tf2onnx")
    with pytest.raises(SwiftSVDError, match="latent-v cache needs the traced graph"):
        export_onnx(lowrank_dir, tmp_path / "o", graph="optimum", kv_cache="latent-v")
    assert not (tmp_path / "o").exists()


def test_mobile_ort_format(exports, torch_model):
    _, tok = torch_model
    folder = exports["fp32"]
    s = json.loads((folder / "summary.json").read_text())
    assert (folder / "model.ort").is_file() and (folder / "required_operators.config").is_file()
    assert s["mobile"]["ort_bytes"] == (folder / "model.ort").stat().st_size
    ops = {op for v in s["mobile"]["operators"].values() for op in v}
    assert "MatMul" in ops and s["mobile"]["n_operators"] == sum(len(v) for v in s["mobile"]["operators"].values())
    ids = np.asarray([tok(PROMPTS[0])["input_ids"]])
    a = OrtDecoder(folder, model_file="model.ort").logits(ids)
    b = OrtDecoder(folder).logits(ids)
    assert np.abs(a - b).max() < 1e-4


def test_generate_command(exports, capsys):
    args = argparse.Namespace(artifact=str(exports["int8"]), prompt="Once upon a time", max_new_tokens=6,
                              temperature=0.0, top_p=1.0, seed=0, threads=1, target="onnx")
    assert onnx_cli.run_generate(args) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Once upon a time")
    assert "decode" in cap.err and "tok/s" in cap.err
    tok = load_tokenizer(exports["int8"])
    assert encode(tok, exports["int8"], "Once")  # plain `tokenizers`, no transformers needed


def test_dense_folder_exports(tmp_path, torch_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    dense = tmp_path / "dense"
    LlamaForCausalLM(cfg).save_pretrained(dense)
    torch_model[1].save_pretrained(dense)
    s = export_onnx(dense, tmp_path / "dense-onnx")
    assert s["lowrank"] is False and s["graph_check"]["ort_optimized"]["ok"]
    g = onnx.load(str(tmp_path / "dense-onnx" / "model.onnx"))
    assert sum(n.op_type in MATMUL_OPS for n in g.graph.node) >= 7


# --- bad input -------------------------------------------------------------------------------

def _export_args(src, out, **kw) -> argparse.Namespace:
    base = dict(model_dir=str(src), output=str(out), overwrite=False, precision="fp32", quantize="none",
                block_size=None, mobile=False, target="onnx")
    base.update(kw)
    return argparse.Namespace(**base)


def test_unknown_quantization_mode(lowrank_dir, tmp_path):
    with pytest.raises(SwiftSVDError, match="unknown quantization mode 'int3'.*none, int8, int4, int4-a8, int8-dynamic"):
        onnx_cli.run_export(_export_args(lowrank_dir, tmp_path / "o", quantize="int3"))
    with pytest.raises(SwiftSVDError, match="unknown precision"):
        onnx_cli.run_export(_export_args(lowrank_dir, tmp_path / "o", precision="int2"))
    with pytest.raises(SwiftSVDError, match="power of two"):
        onnx_cli.run_export(_export_args(lowrank_dir, tmp_path / "o", quantize="int4", block_size=24))
    with pytest.raises(SwiftSVDError, match="--accuracy-level 2: choose 4"):
        onnx_cli.run_export(_export_args(lowrank_dir, tmp_path / "o", quantize="int8", accuracy_level=2))
    with pytest.raises(SwiftSVDError, match="--accuracy-level only applies to --quantize int8, int4"):
        onnx_cli.run_export(_export_args(lowrank_dir, tmp_path / "o", quantize="int8-dynamic", accuracy_level=1))
    assert not (tmp_path / "o").exists()


def test_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SwiftSVDError, match="not a model folder"):
        export_onnx(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    with pytest.raises(SwiftSVDError, match="not a model folder"):
        export_onnx(tmp_path / "cfgonly", tmp_path / "o")
    with pytest.raises(SwiftSVDError, match="no such model folder"):
        export_onnx(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(SwiftSVDError, match="not an ONNX export folder"):
        onnx_cli.run_generate(argparse.Namespace(artifact=str(tmp_path / "nope"), prompt="x", max_new_tokens=2,
                                                 temperature=0.0, top_p=1.0, seed=0, threads=1))
    with pytest.raises(SwiftSVDError, match="no model.onnx"):
        OrtDecoder(tmp_path / "empty")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(lowrank_dir, exports, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SwiftSVDError, match="already exists.*--overwrite"):
        onnx_cli.run_export(_export_args(lowrank_dir, out))
    assert (out / "keep.txt").is_file()
    assert onnx_cli.run_export(_export_args(lowrank_dir, out, overwrite=True)) == 0
    assert (out / "model.onnx").is_file() and not (out / "keep.txt").exists()


def test_failed_export_leaves_nothing(lowrank_dir, tmp_path, monkeypatch):
    from swiftsvd_export.backends.onnx import export as export_mod

    def broken(graph, factors):
        raise SwiftSVDError("graph check failed (injected)")

    monkeypatch.setattr(export_mod, "check_pairs", broken)
    out = tmp_path / "out"
    with pytest.raises(SwiftSVDError, match="injected"):
        export_onnx(lowrank_dir, out)
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder


def test_cli_export_and_generate(lowrank_dir, tmp_path, capsys):
    from swiftsvd_export.cli import main

    out = tmp_path / "cli-onnx"
    assert main(["export", "--target", "onnx", str(lowrank_dir), str(out), "--quantize", "int3"]) == 2
    assert "unknown quantization mode 'int3'" in capsys.readouterr().err
    assert main(["export", "--target", "onnx", str(tmp_path), str(out)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["export", "--target", "onnx", str(lowrank_dir), str(out), "--factor-type", "q8_0"]) == 2
    assert "--factor-type: gguf option(s), not for --target onnx" in capsys.readouterr().err
    assert main(["export", "--target", "gguf", str(lowrank_dir), str(tmp_path / "m.gguf"), "--quantize", "int8",
                 "--block-size", "32"]) == 2
    assert "--quantize, --block-size: onnx option(s), not for --target gguf" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export", "--target", "onnx", str(lowrank_dir), str(out), "--precision", "fp16"]) == 0
    assert main(["export", "--target", "onnx", str(lowrank_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["generate", "--target", "onnx", str(out), "The quick", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("The quick") and "sampled" in cap.err and "tok/s" in cap.err


def test_own_loop_runs_without_optimum(exports):
    """The runtime path works with optimum absent (blocked) and never imports transformers.

    (torch is still imported by ``swiftsvd_export/__init__``'s eager ``lowrank`` import.)"""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['optimum'] = None\n"
        "import argparse\n"
        "from swiftsvd_export.backends.onnx import cli\n"
        f"a = argparse.Namespace(artifact={str(exports['fp32'])!r}, prompt='The quick', max_new_tokens=4,"
        " temperature=0.0, top_p=1.0, seed=0, threads=1)\n"
        "rc = cli.run_generate(a)\n"
        "assert 'transformers' not in sys.modules, 'runtime imported transformers'\n"
        "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("The quick") and "decode" in r.stderr


def test_int8_dynamic_graphs_need_no_session_setting(exports, torch_model):
    """The int8-dynamic graph keeps its weights in [-64, 64], per output column, so onnxruntime's
    default x64 kernel (pairs of u8·s8 products summed in 16 bits without VNNI) cannot saturate
    (2·255·64 < 2¹⁵):
    a user's plain session gives the same logits as the project's exact-kernel session. With
    full-range per-tensor weights the plain session on this CPU was 0.12 off on this tiny model
    (and scored a perplexity of 12.8 million on the real 0.4 model)."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from swiftsvd_export.backends.onnx.runtime import OrtDecoder, session_options

    path = exports["int8-dynamic"] / "model.onnx"
    g = onnx.load(str(path))
    inits = {i.name: i for i in g.graph.initializer}
    weights = [numpy_helper.to_array(inits[n.input[1]]) for n in g.graph.node if n.op_type == "MatMulInteger"]
    zero_points = [numpy_helper.to_array(inits[n.input[3]]) for n in g.graph.node if n.op_type == "MatMulInteger"]
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 for w in weights)
    assert all(z.shape == (w.shape[1],) for z, w in zip(zero_points, weights))  # one scale per column
    dec = OrtDecoder(exports["int8-dynamic"], threads=1)
    plain = ort.SessionOptions()
    plain.add_session_config_entry("session.x64quantprecision", "0")
    ids = np.asarray([prompt_ids(torch_model[1])[0]])
    ours = dec.logits(ids)
    dec.session = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(dec.logits(ids), ours)
    assert session_options().get_session_config_entry("session.x64quantprecision") == "1"


def test_sessions_compute_int8_dynamic_matmuls_exactly():
    """int8-dynamic graphs run MatMulInteger (u8 activations × s8 weights). On x64 CPUs without VNNI
    (this one) onnxruntime's default kernel adds the products in pairs in 16 bits and saturates:
    255·127·64 comes out as 1,048,544 instead of 2,072,640, and the real 0.4 model's int8-dynamic
    perplexity was 12.8 million instead of 930. The project's sessions pick the exact kernel."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from swiftsvd_export.backends.onnx.runtime import session_options

    k, n = 64, 16
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [1, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, n])],
                          [numpy_helper.from_array(np.full((k, n), 127, np.int8), "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    for threads in (1, 2):
        s = ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
        assert (s.run(None, {"A": np.full((1, k), 255, np.uint8)})[0] == 255 * 127 * k).all()
