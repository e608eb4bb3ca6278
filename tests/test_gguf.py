"""GGUF target: tensor layout read back with gguf-py, parity in the patched llama.cpp, bad input.

Tests marked ``llamacpp`` need the patched libllama in the cache (``swiftsvd-export build-llamacpp``);
they fail, not skip, when it is missing.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from swiftsvd_export.backends.gguf import build
from swiftsvd_export.backends.gguf.writer import LOWRANK_KEY, export_gguf, permute_rows
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.lowrank import LowRankLinear, replace_module, save_lowrank

from .conftest import make_tiny_llama, make_tokenizer

# module -> rank; 24 is not a multiple of 32 (exercises the per-tensor F16 fallback)
RANKS = {
    "model.layers.0.self_attn.q_proj": 32,
    "model.layers.0.self_attn.k_proj": 24,
    "model.layers.0.mlp.down_proj": 32,
    "model.layers.1.self_attn.o_proj": 32,
    "model.layers.1.mlp.gate_proj": 32,
    "model.layers.1.mlp.up_proj": 32,
}


def _factorize(model, ranks):
    for name, k in ranks.items():
        lin = model.get_submodule(name)
        U, S, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        r = S[:k].sqrt()
        A = (r[:, None] * Vh[:k]).float()
        B = (U[:, :k] * r[None, :]).float()
        replace_module(model, name, LowRankLinear.from_factors(A, B))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(low-rank folder, dense folder, low-rank torch model) for a tiny random GQA Llama."""
    root = tmp_path_factory.mktemp("gguf-tiny")
    dense_dir, lr_dir = root / "dense", root / "lowrank"
    tok = make_tokenizer(dense_dir)
    model = make_tiny_llama(seed=1)
    with torch.no_grad():  # sharper logits than the 0.02 init, so top-1 is well defined
        model.model.embed_tokens.weight.mul_(25.0)
    model.save_pretrained(dense_dir, safe_serialization=True)
    _factorize(model, RANKS)
    save_lowrank(model, lr_dir, dtype="fp32", tokenizer=tok)
    return lr_dir, dense_dir, model.eval(), tok


def _ids(tok, n=96):
    from swiftsvd_export.backends.gguf.parity import WIKI_TEST

    text = WIKI_TEST.read_text(encoding="utf-8")[:5000]
    return tok(text, add_special_tokens=False)["input_ids"][:n]


def _reader(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def test_quiet_export_keeps_gguf_py_quiet(tiny, tmp_path, caplog):
    """quiet=True (the release pipeline's exports) keeps gguf-py's INFO lines out, the whole chat template
    among them, and restores the logger afterwards."""
    import logging

    gguf_log = logging.getLogger("gguf")
    old = gguf_log.level
    gguf_log.setLevel(logging.NOTSET)  # as in a process where the CLI has not set it
    try:
        caplog.set_level(logging.INFO)
        export_gguf(tiny[0], tmp_path / "q.gguf", quiet=True)
        assert not [r for r in caplog.records if r.name.startswith("gguf")]
        assert gguf_log.level == logging.NOTSET
        export_gguf(tiny[0], tmp_path / "v.gguf")
        assert [r for r in caplog.records if r.name.startswith("gguf")]  # not quiet: they are there
    finally:
        gguf_log.setLevel(old)


def test_tensor_names_shapes_types(tiny, tmp_path):
    import gguf

    lr_dir, _, model, _ = tiny
    out = tmp_path / "m-q8.gguf"
    summary = export_gguf(lr_dir, out, factor_type="q8_0", embed_type="f16", quiet=True)
    r, t = _reader(out)
    assert r.fields[LOWRANK_KEY].contents() == 2
    assert r.fields["general.architecture"].contents() == "llama"
    assert summary.n_lowrank == len(RANKS)
    Q8, F16, F32 = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                    gguf.GGMLQuantizationType.F32)
    # a low-rank pair replaces the dense name; gguf-py shapes are (ne0, ne1) = (cols, rows)
    assert "blk.0.attn_q.weight" not in t
    # q (rank 32) and k (rank 24) share their input: one stacked A, v is dense
    assert list(t["blk.0.attn_qkv_lr_a.weight"].shape) == [64, 32 + 24]
    assert "blk.0.attn_q_lr_a.weight" not in t and "blk.0.attn_k_lr_a.weight" not in t
    assert list(t["blk.0.attn_q_lr_b.weight"].shape) == [32, 64]
    assert t["blk.0.attn_qkv_lr_a.weight"].tensor_type == Q8
    assert t["blk.0.attn_q_lr_b.weight"].tensor_type == Q8
    # rank 24 does not fit the 32-wide block: B falls back to F16, A (rows of 64) stays Q8_0
    assert list(t["blk.0.attn_k_lr_b.weight"].shape) == [24, 32]
    assert t["blk.0.attn_k_lr_b.weight"].tensor_type == F16
    assert any("blk.0.attn_k_lr_b.weight" in f for f in summary.fallbacks)
    assert list(t["blk.1.ffn_gate_up_lr_a.weight"].shape) == [64, 32 + 32]
    assert list(t["blk.1.attn_output_lr_a.weight"].shape) == [64, 32]
    # dense matrices keep their names; norms F32; embeddings at the chosen type
    assert list(t["blk.0.attn_v.weight"].shape) == [64, 32]
    assert t["blk.0.attn_v.weight"].tensor_type == Q8
    assert list(t["blk.0.ffn_down_lr_a.weight"].shape) == [160, 32]
    assert list(t["blk.0.ffn_down_lr_b.weight"].shape) == [32, 64]
    assert t["blk.0.attn_norm.weight"].tensor_type == F32
    assert t["token_embd.weight"].tensor_type == F16
    assert "output.weight" not in t  # tied
    assert sorted(n for n in t if n.endswith("_lr_a.weight")) == [
        "blk.0.attn_qkv_lr_a.weight", "blk.0.ffn_down_lr_a.weight",
        "blk.1.attn_output_lr_a.weight", "blk.1.ffn_gate_up_lr_a.weight"]
    assert sum(1 for n in t if n.endswith("_lr_b.weight")) == len(RANKS)


def test_q4_0_where_the_rank_fits(tiny, tmp_path):
    import gguf

    out = tmp_path / "m-q4.gguf"
    export_gguf(tiny[0], out, factor_type="q4_0", embed_type="q8_0", quiet=True)
    _, t = _reader(out)
    assert t["blk.0.attn_q_lr_b.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert t["blk.0.attn_k_lr_b.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_rope_permutation_on_b_rows_only(tiny, tmp_path):
    lr_dir, _, model, _ = tiny
    out = tmp_path / "m-f32.gguf"
    export_gguf(lr_dir, out, factor_type="f32", embed_type="f32", quiet=True)
    _, t = _reader(out)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    k = model.get_submodule("model.layers.0.self_attn.k_proj")
    a = np.asarray(t["blk.0.attn_qkv_lr_a.weight"].data)  # A_q rows, then A_k rows
    b = np.asarray(t["blk.0.attn_q_lr_b.weight"].data)
    np.testing.assert_array_equal(a, np.concatenate([q.A.weight.detach().numpy(), k.A.weight.detach().numpy()]))
    np.testing.assert_array_equal(b, permute_rows(q.B.weight.detach().numpy(), 4))
    assert not np.array_equal(b, q.B.weight.detach().numpy())
    kb = np.asarray(t["blk.0.attn_k_lr_b.weight"].data)
    np.testing.assert_array_equal(kb, permute_rows(k.B.weight.detach().numpy(), 2))


def test_dense_export_has_no_lowrank_tensors(tiny, tmp_path):
    _, dense_dir, _, _ = tiny
    out = tmp_path / "dense.gguf"
    export_gguf(dense_dir, out, factor_type="f16", quiet=True)
    r, t = _reader(out)
    assert LOWRANK_KEY not in r.fields
    assert not any("_lr_" in n for n in t)
    for i in range(2):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{n}.weight" in t


def test_refuses_existing_output_and_bad_types(tiny, tmp_path):
    lr_dir, _, _, _ = tiny
    out = tmp_path / "x.gguf"
    out.write_bytes(b"x")
    with pytest.raises(SwiftSVDError, match="already exists"):
        export_gguf(lr_dir, out, quiet=True)
    with pytest.raises(SwiftSVDError, match="unknown factor type"):
        export_gguf(lr_dir, tmp_path / "y.gguf", factor_type="q3_k", quiet=True)
    assert out.read_bytes() == b"x" and not (tmp_path / "y.gguf").exists()


def test_failed_patch_names_the_file(tmp_path):
    """A tree from another llama.cpp version: the build stops naming the file that did not apply."""
    patches = build.patch_files()
    for rel in ("src/llama-arch.cpp", "src/llama-arch.h", "src/llama-graph.cpp", "src/llama-graph.h",
                "src/models/llama.cpp", "src/models/models.h"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("// some other llama.cpp version\n" * 50)
    with pytest.raises(SwiftSVDError, match=r"0001-swiftsvd-lowrank-llama\.patch.*src/llama-arch\.cpp"):
        build.apply_patches(tmp_path, patches)
    assert "some other" in (tmp_path / "src/llama-arch.cpp").read_text()  # nothing half-applied


def test_cache_key_follows_the_patch(tmp_path):
    patches = build.patch_files()
    opts = build.cmake_options()
    h1 = build.patch_hash(patches, opts)
    changed = tmp_path / patches[0].name
    changed.write_bytes(patches[0].read_bytes() + b"\n")
    assert build.patch_hash([changed], opts) != h1
    assert build.patch_hash(patches, build.cmake_options(native=False)) != h1


# ---------------------------------------------------------------- patched llama.cpp

def _need_build():
    d = build.lib_dir()
    assert build.is_built(d), (f"patched llama.cpp not built ({d}); run `swiftsvd-export build-llamacpp` "
                               "(CI: .ci/run builds it before the tests)")


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype,max_dlogit,min_top1", [("f32", 1e-2, 0.99), ("f16", 0.25, 0.9),
                                                        ("q8_0", 0.5, 0.9)])
def test_parity_with_torch(tiny, tmp_path, ftype, max_dlogit, min_top1):
    _need_build()
    from swiftsvd_export.backends.gguf import parity, runtime

    lr_dir, _, model, tok = tiny
    out = tmp_path / f"m-{ftype}.gguf"
    export_gguf(lr_dir, out, factor_type=ftype, embed_type=ftype, quiet=True)
    ids = _ids(tok)
    ref = parity.torch_logits(model, ids)
    llm = runtime.open_model(out, n_ctx=256, n_threads=2, logits_all=True, n_batch=128, kv_f32=True)
    got = runtime.logits(llm, ids)
    r = parity.compare_logits(ref, got)
    assert r["max_abs_dlogit"] <= max_dlogit and r["top1_agreement"] >= min_top1, r
    if ftype == "f32":
        prompt = ids[:12]
        assert runtime.greedy(llm, prompt, 24) == parity.torch_greedy(model, prompt, 24, tok.eos_token_id)


@pytest.mark.llamacpp
def test_dense_parity(tiny, tmp_path):
    _need_build()
    from transformers import AutoModelForCausalLM

    from swiftsvd_export.backends.gguf import parity, runtime

    _, dense_dir, _, tok = tiny
    out = tmp_path / "dense-f32.gguf"
    export_gguf(dense_dir, out, factor_type="f32", embed_type="f32", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ids = _ids(tok, 64)
    llm = runtime.open_model(out, n_ctx=128, n_threads=2, logits_all=True, kv_f32=True)
    r = parity.compare_logits(parity.torch_logits(model, ids), runtime.logits(llm, ids))
    assert r["max_abs_dlogit"] <= 1e-2 and r["top1_agreement"] >= 0.99, r


def _export_tampered(lr_dir, out, monkeypatch, drop=None, reshape=None, version=None):
    import gguf

    orig_tensor, orig_u32 = gguf.GGUFWriter.add_tensor, gguf.GGUFWriter.add_uint32

    def add_tensor(self, name, tensor, *a, **k):
        if name == drop:
            return None
        if name == reshape:
            tensor = np.ascontiguousarray(tensor[:, :-1])
        return orig_tensor(self, name, tensor, *a, **k)

    def add_uint32(self, key, val):
        return orig_u32(self, key, version if (key == LOWRANK_KEY and version is not None) else val)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
        m.setattr(gguf.GGUFWriter, "add_uint32", add_uint32)
        export_gguf(lr_dir, out, factor_type="f32", embed_type="f32", quiet=True)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["blk.1.ffn_up_lr_b.weight", "blk.1.ffn_gate_up_lr_a.weight",
                                  "blk.0.attn_qkv_lr_a.weight", "blk.0.ffn_down_lr_a.weight"])
def test_missing_factor_fails_at_load_naming_it(tiny, tmp_path, monkeypatch, name):
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    out = tmp_path / "missing.gguf"
    _export_tampered(tiny[0], out, monkeypatch, drop=name)
    with pytest.raises(SwiftSVDError, match=rf"missing tensor '{re.escape(name)}'"):
        runtime.open_model(out, n_ctx=64)


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["blk.0.attn_q_lr_b.weight", "blk.1.attn_output_lr_b.weight"])
def test_mismatched_shape_fails_at_load_naming_it(tiny, tmp_path, monkeypatch, name):
    """One column less in B: a stacked A no longer matches the ranks (both named), a single A its B."""
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    out = tmp_path / "shape.gguf"
    _export_tampered(tiny[0], out, monkeypatch, reshape=name)
    with pytest.raises(SwiftSVDError, match=re.escape(name)):
        runtime.open_model(out, n_ctx=64)


@pytest.mark.llamacpp
def test_unknown_format_version_is_refused(tiny, tmp_path, monkeypatch):
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    out = tmp_path / "v99.gguf"
    _export_tampered(tiny[0], out, monkeypatch, version=99)
    with pytest.raises(SwiftSVDError, match=r"swiftsvd\.lowrank\.version 99"):
        runtime.open_model(out, n_ctx=64)


@pytest.mark.llamacpp
def test_cli_export_and_generate(tiny, tmp_path, capsys):
    _need_build()
    from swiftsvd_export.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "--target", "gguf", str(tiny[0]), str(out), "--factor-type", "q8_0"]) == 0
    assert main(["generate", "--target", "gguf", str(out), "The", "--max-new-tokens", "5",
                 "--threads", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("The")


@pytest.mark.llamacpp
def test_cached_build_is_reused():
    _need_build()
    import time

    t0 = time.time()
    d = build.build_libs()
    assert d == build.lib_dir() and time.time() - t0 < 5
    info = json.loads((d / "build.json").read_text())
    assert info["llama_cpp_commit"] == build.LLAMA_CPP_COMMIT


def test_aarch64_cross_build_has_its_own_cache_key():
    """tools/check_arm.py's cross builds sit beside the native one: other options, other key, and
    the native build's options (and so its cached key) do not change."""
    arm = build.cmake_options(arm_arch="armv8.2-a+dotprod+i8mm")
    assert "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+i8mm" in arm and "-DGGML_NATIVE=OFF" in arm
    assert "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++" in arm
    assert not any("aarch64" in o or "CMAKE_SYSTEM_NAME" in o for o in build.cmake_options())
    keys = {build.lib_dir(), build.lib_dir(arm_arch="armv8.2-a+dotprod+i8mm"),
            build.lib_dir(arm_arch="armv8.2-a+dotprod")}
    assert len(keys) == 3 and sum("aarch64" in d.name for d in keys) == 2
