"""Importance-weighted Q4_0 factors: the E[x²] vectors, which tensor gets which, ggml's weighted quantizer.

Tests marked ``llamacpp`` need the llama.cpp build (its libggml-base quantizes); they fail, not skip,
when it is missing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swiftsvd_export.channel_importance import LATENT, measure
from swiftsvd_export.backends.gguf.writer import export_gguf
from swiftsvd_export.cli import main
from swiftsvd_export.lowrank import save_lowrank

from .conftest import make_tiny_llama, make_tokenizer
from .test_gguf import _factorize, _need_build, _reader

RANKS = {f"model.layers.{i}.{m}": 32 for i in range(2)
         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.gate_proj")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny low-rank Llama folder (q/k/v and gate stacked or single A's, dense o/up) and its model."""
    d = tmp_path_factory.mktemp("imatrix") / "m"
    tok = make_tokenizer(d.parent / "tok")
    model = make_tiny_llama(seed=3, hidden=128)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
    _factorize(model, RANKS)
    save_lowrank(model, d, dtype="fp32", tokenizer=tok)
    return d, model.eval(), tok


def test_measure_is_the_mean_square_of_each_input(tiny, calib_txt):
    """E[x²] of layer 0's attention input, and of q_proj's latent A·x, computed here from the model's own
    pieces (embedding, then input norm) on the same calibration windows."""
    from swiftsvd_export.calibration import build_calibration

    d, model, tok = tiny
    imp = measure(d, calib_txt, nsamples=2, seqlen=128, progress=False)
    ids = build_calibration(tok, calib_txt, 2, 128, 0, cache=False).ids
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 128).double()
        z = model.model.layers[0].self_attn.q_proj.A(x.float()).double()
    pre = "model.layers.0."
    np.testing.assert_allclose(imp.vectors[pre + "self_attn.q_proj"], (x * x).mean(0).numpy(), rtol=1e-4)
    np.testing.assert_allclose(imp.vectors[pre + "self_attn.q_proj" + LATENT], (z * z).mean(0).numpy(), rtol=1e-4)
    # q/k/v read one input; every block linear has its input vector, every factorized one its latent's
    np.testing.assert_array_equal(imp.vectors[pre + "self_attn.k_proj"], imp.vectors[pre + "self_attn.q_proj"])
    linears = {n for n, m in model.named_modules() if ".layers." in n and n.rsplit(".", 1)[-1].endswith("proj")}
    assert set(imp.vectors) == linears | {n + LATENT for n in RANKS}
    assert imp.tokens == 256 and imp.chunks == 2


def _weighted_error(ref: np.ndarray, tensor, w: np.ndarray) -> float:
    import gguf

    q = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ref.shape)
    return float((((ref - q) ** 2) * w[None, :]).sum())


@pytest.mark.llamacpp
def test_each_q4_0_tensor_is_weighted_by_its_own_input(tiny, calib_txt, tmp_path):
    """Each Q4_0 tensor is ggml's weighted quantization of that matrix under *its* input's vector (B:
    its latent's; a stacked A and the dense weights: the block input's), byte for byte. For the B's,
    whose latents differ most in energy, that beats both gguf-py's plain rounding and ggml's search
    with uniform weights in the importance-weighted error."""
    import gguf
    from safetensors.numpy import load_file

    from swiftsvd_export.backends.gguf.ggml_quantize import GGMLQuantizer
    from swiftsvd_export.backends.gguf.runtime import patched_lib_dir
    from swiftsvd_export.backends.gguf.writer import permute_rows

    _need_build()
    d, model, _ = tiny
    imp = measure(d, calib_txt, nsamples=2, seqlen=512, progress=False)  # what export_gguf measures itself
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    export_gguf(d, plain, factor_type="q4_0", embed_type="q8_0", quiet=True)
    s = export_gguf(d, weighted, factor_type="q4_0", embed_type="q8_0", quiet=True, imatrix_calib=calib_txt,
                    imatrix_samples=2)
    sd = load_file(str(d / "model.safetensors"))
    r, tw = _reader(weighted)
    _, tp = _reader(plain)
    ggml, Q4 = GGMLQuantizer(patched_lib_dir()), gguf.GGMLQuantizationType.Q4_0
    assert r.fields["quantize.imatrix.chunks_count"].contents() == 2
    n_heads = model.config.num_attention_heads
    checked = 0
    for i in range(2):
        pre = f"model.layers.{i}."
        x = imp.vectors[pre + "self_attn.q_proj"]
        cases = {
            f"blk.{i}.attn_qkv_lr_a.weight": (np.concatenate([sd[pre + f"self_attn.{p}_proj.A.weight"] for p in "qkv"]), x),
            f"blk.{i}.attn_q_lr_b.weight": (permute_rows(sd[pre + "self_attn.q_proj.B.weight"], n_heads),
                                             imp.vectors[pre + "self_attn.q_proj" + LATENT]),
            f"blk.{i}.attn_v_lr_b.weight": (sd[pre + "self_attn.v_proj.B.weight"], imp.vectors[pre + "self_attn.v_proj" + LATENT]),
            f"blk.{i}.attn_output.weight": (sd[pre + "self_attn.o_proj.weight"], imp.vectors[pre + "self_attn.o_proj"]),
            f"blk.{i}.ffn_down_lr_b.weight": (sd[pre + "mlp.down_proj.B.weight"], imp.vectors[pre + "mlp.down_proj" + LATENT]),
            f"blk.{i}.ffn_up.weight": (sd[pre + "mlp.up_proj.weight"], imp.vectors[pre + "mlp.up_proj"]),
        }
        for name, (ref, w) in cases.items():
            assert tw[name].tensor_type.name == "Q4_0", name
            np.testing.assert_array_equal(np.asarray(tw[name].data), ggml.quantize(ref, Q4, w), err_msg=name)
            if "_lr_b" in name:
                uniform = ggml.quantize(ref, Q4, np.ones_like(w))
                q = gguf.quants.dequantize(uniform, Q4).reshape(ref.shape)
                e_uniform = float((((ref - q) ** 2) * w[None, :]).sum())
                ew, ep = _weighted_error(ref, tw[name], w), _weighted_error(ref, tp[name], w)
                assert ew < ep and ew < e_uniform, (name, ew, ep, e_uniform)
            checked += 1
    assert checked == 12
    # every block matrix is Q4_0 and weighted: 2 layers x (qkv A, q/k/v B, o, gate A, gate B, up, down A, down B)
    assert s.n_weighted == 2 * 10 == sum(t.tensor_type.name == "Q4_0" for t in r.tensors)


@pytest.mark.llamacpp
def test_a_factors_at_their_own_type(tiny, calib_txt, tmp_path):
    """--a-type q8_0 with --factor-type q4_0: every A at Q8_0, every B and dense block weight at
    weighted Q4_0 (Q8_0 has no weighted variant in ggml)."""
    _need_build()
    d, _, _ = tiny
    imp = measure(d, calib_txt, nsamples=2, seqlen=128, progress=False)
    s = export_gguf(d, tmp_path / "m.gguf", factor_type="q4_0", a_type="q8_0", embed_type="q8_0", quiet=True,
                    importance=imp)
    _, t = _reader(tmp_path / "m.gguf")
    types = {n: x.tensor_type.name for n, x in t.items() if n.startswith("blk.") and "norm" not in n}
    assert {n for n, ty in types.items() if ty == "Q8_0"} == {n for n in types if "_lr_a" in n} != set()
    assert s.n_weighted == sum(ty == "Q4_0" for ty in types.values()) == 2 * 7
    from swiftsvd_export.validation.artifacts import discover

    (art,) = discover([tmp_path / "m.gguf"])
    assert set(art.variant.split("+")) == {"q4_0", "q8_0"}  # the report names both types, by bytes


@pytest.mark.llamacpp
def test_cli_q4_0_runs_the_importance_pass(tiny, calib_txt, tmp_path, capsys):
    _need_build()
    d, _, _ = tiny
    out = tmp_path / "m.gguf"
    assert main(["export", "--target", "gguf", str(d), str(out), "--factor-type", "q4_0", "--embed-type", "q8_0",
                 "--imatrix-calib", str(calib_txt), "--imatrix-samples", "2"]) == 0
    assert "20 Q4_0 tensors quantized with importance weights (E[x²] from 2 x 512 tokens" in capsys.readouterr().out
    r, _ = _reader(out)
    assert r.fields["quantize.imatrix.dataset"].contents() == calib_txt.name
    plain = tmp_path / "plain.gguf"
    assert main(["export", "--target", "gguf", str(d), str(plain), "--factor-type", "q4_0", "--embed-type", "q8_0",
                 "--no-imatrix"]) == 0
    assert "importance" not in capsys.readouterr().out
    r, _ = _reader(plain)
    assert "quantize.imatrix.dataset" not in r.fields


@pytest.mark.llamacpp
def test_cli_importance_bad_input(tiny, tmp_path, capsys):
    """A missing calibration file and an existing output fail with one line (the latter before the
    importance pass), leaving nothing behind."""
    _need_build()
    d, _, _ = tiny
    out = tmp_path / "m.gguf"
    assert main(["export", "--target", "gguf", str(d), str(out), "--factor-type", "q4_0",
                 "--imatrix-calib", str(tmp_path / "nope.txt")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt" in err[0], err
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"x")
    assert main(["export", "--target", "gguf", str(d), str(out), "--factor-type", "q4_0"]) != 0
    err = capsys.readouterr().err
    assert "already exists" in err and "importance (E[x" not in err
    assert out.read_bytes() == b"x"


@pytest.mark.llamacpp
def test_q4_0_blocks_repacked_for_onnxruntime_decode_the_same(tmp_path):
    """ggml's Q4_0 blocks, repacked as MatMulNBits' symmetric 4-bit blocks of 32, give in onnxruntime
    (fp32 compute) x @ W with W dequantized from the Q4_0 bytes by gguf-py: same numbers, nibble order
    and scale layout right."""
    import gguf
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from swiftsvd_export.backends.gguf.ggml_quantize import GGMLQuantizer
    from swiftsvd_export.backends.gguf.runtime import patched_lib_dir
    from swiftsvd_export.backends.onnx.quantize import q4_0_as_nbits

    _need_build()
    rng = np.random.default_rng(0)
    k, n = 96, 40
    W = rng.standard_normal((k, n)).astype(np.float32)  # the MatMul's weight: x (.., k) @ W (k, n)
    imp = np.exp(rng.standard_normal(k)).astype(np.float32)
    q4 = GGMLQuantizer(patched_lib_dir()).quantize(W.T, gguf.GGMLQuantizationType.Q4_0, imp)
    packed, scales = q4_0_as_nbits(q4, n, k)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=32, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    W_q = gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_0).reshape(n, k).T
    assert not np.allclose(W_q, W, atol=1e-3)  # it is really 4-bit
    np.testing.assert_allclose(y, x @ W_q, rtol=1e-4, atol=1e-4)


def test_missing_build_says_how_to_do_without(monkeypatch):
    """Without the llama.cpp build, weighted 4-bit export fails in one line naming both ways out."""
    from swiftsvd_export.backends.gguf import ggml_quantize, runtime
    from swiftsvd_export.errors import SwiftSVDError

    def missing():
        raise SwiftSVDError("the patched llama.cpp is not built (/x is missing): run `swiftsvd-export build-llamacpp`")

    monkeypatch.setattr(runtime, "patched_lib_dir", missing)
    with pytest.raises(SwiftSVDError, match=r"build-llamacpp.*--no-imatrix"):
        ggml_quantize.GGMLQuantizer.from_build()
