"""Latent KV cache in the patched llama.cpp (``export --target gguf --kv-cache latent-v|latent-kv``).

A tiny random GQA Llama whose k_proj and v_proj are factorized in every layer (ranks 16 and 12 of
d_kv = 32) runs with a dense, a V-latent and a K+V-latent cache; logits and greedy decoding are
checked against torch's dense-cache low-rank model and against the dense-cache GGUF, across several
batches (prefill, then decode). Tests marked ``llamacpp`` need the patched libllama (see test_gguf).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swiftsvd_export.backends.gguf.writer import KV_LAYOUT_KEY, export_gguf
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.lowrank import save_lowrank

from .conftest import make_tiny_llama, make_tokenizer
from .test_gguf import _factorize, _need_build, _reader

RANK_K, RANK_V, D_KV = 16, 12, 32
RANKS = {
    **{f"model.layers.{i}.self_attn.k_proj": RANK_K for i in range(2)},
    **{f"model.layers.{i}.self_attn.v_proj": RANK_V for i in range(2)},
    "model.layers.0.self_attn.q_proj": 32,
    "model.layers.1.mlp.down_proj": 32,
}
LAYOUTS = ("dense", "latent-v", "latent-kv")
N_BATCH = 128  # contexts below span several batches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(low-rank folder, low-rank torch model, tokenizer, {layout: F32 GGUF})."""
    root = tmp_path_factory.mktemp("gguf-latent")
    lr_dir = root / "lowrank"
    tok = make_tokenizer(root / "tok")
    model = make_tiny_llama(seed=3)
    with torch.no_grad():  # sharper logits than the 0.02 init, so top-1 is well defined
        model.model.embed_tokens.weight.mul_(25.0)
    _factorize(model, RANKS)
    save_lowrank(model, lr_dir, dtype="fp32", tokenizer=tok)
    ggufs = {}
    for layout in LAYOUTS:
        ggufs[layout] = root / f"{layout}.gguf"
        export_gguf(lr_dir, ggufs[layout], factor_type="f32", embed_type="f32", quiet=True, kv_cache=layout)
    return lr_dir, model.eval(), tok, ggufs


@pytest.fixture(scope="module")
def ids(tiny):
    from swiftsvd_export.backends.gguf.parity import wikitext_ids

    return wikitext_ids(tiny[2], 1024)


def test_layout_key(tiny):
    *_, ggufs = tiny
    fields = {layout: _reader(path)[0].fields for layout, path in ggufs.items()}
    assert KV_LAYOUT_KEY not in fields["dense"]
    assert list(fields["latent-v"][KV_LAYOUT_KEY].contents()) == [1, 1]
    assert list(fields["latent-kv"][KV_LAYOUT_KEY].contents()) == [3, 3]


@pytest.mark.parametrize("layout,proj", [("latent-v", "v_proj"), ("latent-kv", "v_proj"), ("latent-kv", "k_proj")])
def test_refuses_latent_cache_without_factors(tmp_path, layout, proj):
    """A latent cache caches A·x: a dense projection in any layer is an error, never a dense fallback."""
    tok = make_tokenizer(tmp_path / "tok")
    ranks = {k: v for k, v in RANKS.items() if k != f"model.layers.1.self_attn.{proj}"}
    model = _factorize(make_tiny_llama(seed=4), ranks)
    save_lowrank(model, tmp_path / "m", dtype="fp32", tokenizer=tok)
    out = tmp_path / "m.gguf"
    needs = "k_proj and v_proj" if layout == "latent-kv" else "v_proj"
    with pytest.raises(SwiftSVDError, match=rf"m: KV cache layout '{layout}' needs {needs} factorized in every "
                                            rf"layer; not factorized: model\.layers\.1\.self_attn\.{proj}$"):
        export_gguf(tmp_path / "m", out, quiet=True, kv_cache=layout)
    assert not out.exists()


def test_cli_refuses_latent_cache_on_a_dense_model(tiny_model_dir, tmp_path, capsys):
    from swiftsvd_export.cli import main

    out = tmp_path / "dense.gguf"
    assert main(["export", "--target", "gguf", str(tiny_model_dir), str(out), "--kv-cache", "latent-v"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KV cache layout 'latent-v' needs v_proj factorized in every layer" in err[0], err
    assert not out.exists()


def test_gguf_defaults_to_latent_v_when_v_is_factorized(tiny, tiny_model_dir, tmp_path, capsys):
    """Compressed with v_proj factorized everywhere: V-latent by default; `--kv-cache dense` still dense;
    a dense model (no factors) stays dense by default."""
    from swiftsvd_export.cli import main

    lr_dir = tiny[0]
    for args, want in (([], [1, 1]), (["--kv-cache", "dense"], None)):
        out = tmp_path / f"cli{len(args)}.gguf"
        assert main(["export", "--target", "gguf", str(lr_dir), str(out), "--factor-type", "f32", *args]) == 0
        r, _ = _reader(out)
        assert (list(r.fields[KV_LAYOUT_KEY].contents()) if KV_LAYOUT_KEY in r.fields else None) == want
    assert "KV cache latent-v" in capsys.readouterr().out
    out = tmp_path / "dense.gguf"
    assert main(["export", "--target", "gguf", str(tiny_model_dir), str(out)]) == 0
    assert KV_LAYOUT_KEY not in _reader(out)[0].fields


# ---------------------------------------------------------------- patched llama.cpp

def _open(path, n_ctx=1024, **kw):
    from swiftsvd_export.backends.gguf import runtime

    return runtime.open_model(path, n_ctx=n_ctx, n_threads=2, logits_all=True, n_batch=N_BATCH,
                              **{"kv_f32": True, **kw})


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["latent-v", "latent-kv"])
def test_latent_parity(tiny, ids, layout):
    """Logits over 1000 positions (8 batches) vs torch and vs the dense-cache GGUF; greedy 64 tokens
    after a 960-token prompt (context 1024) identical to both."""
    _need_build()
    from swiftsvd_export.backends.gguf import parity, runtime

    _, model, tok, ggufs = tiny
    seq = ids[:1000]
    ref = parity.torch_logits(model, seq)
    dense = _open(ggufs["dense"])
    want = runtime.logits(dense, seq)
    llm = _open(ggufs[layout])
    got = runtime.logits(llm, seq)
    r_torch, r_dense = parity.compare_logits(ref, got), parity.compare_logits(want, got)
    assert r_torch["max_abs_dlogit"] <= 1e-2 and r_torch["top1_agreement"] >= 0.99, r_torch
    assert r_dense["max_abs_dlogit"] <= 1e-2 and r_dense["top1_agreement"] >= 0.99, r_dense
    prompt = ids[:960]
    new = runtime.greedy(llm, prompt, 64)
    assert new == parity.torch_greedy(model, prompt, 64, tok.eos_token_id)
    assert new == runtime.greedy(dense, prompt, 64)


def _prefill_then_steps(llm, prompt: list[int], cont: list[int]) -> np.ndarray:
    """Logits of ``prompt`` (one batch) followed by ``cont`` one token at a time."""
    llm.reset()
    llm.eval(prompt)
    for t in cont:
        llm.eval([t])
    return np.array(llm.scores[: len(prompt) + len(cont)], dtype=np.float32)


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["latent-v", "latent-kv"])
def test_prefill_then_decode_equals_recompute(tiny, ids, layout):
    """Decoding token by token from the latent cache gives the logits of one full recompute."""
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    llm = _open(tiny[3][layout])
    prompt, cont = ids[:300], ids[300:340]
    stepwise = _prefill_then_steps(llm, prompt, cont)
    full = runtime.logits(llm, prompt + cont)
    assert np.abs(stepwise - full).max() <= 1e-3


@pytest.fixture(scope="module")
def sharp(tiny, tmp_path_factory):
    """(torch model, {layout: F32 GGUF}) of the tiny model with q_proj and k_proj scaled by 10: its
    attention is peaked, so an output row that took another query head's scores is far off (with the
    near-uniform attention of ``tiny`` such an error moves the logits by only ~3e-3)."""
    root = tmp_path_factory.mktemp("gguf-sharp")
    tok = tiny[2]
    model = make_tiny_llama(seed=3)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    _factorize(model, RANKS)
    save_lowrank(model, root / "lowrank", dtype="fp32", tokenizer=tok)
    ggufs = {}
    for layout in ("dense", "latent-v"):
        ggufs[layout] = root / f"{layout}.gguf"
        export_gguf(root / "lowrank", ggufs[layout], factor_type="f32", embed_type="f32", quiet=True,
                    kv_cache=layout)
    return model.eval(), ggufs


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["dense", "latent-v"])
def test_one_token_steps_with_f16_cache_match_recompute_and_torch(sharp, ids, layout):
    """One decoded token's attention with grouped queries (patch 0004: the query heads of a KV head
    are the columns of one product) over the F16 cache users run: the logits of 40 one-token steps
    equal a full recompute's (prompt path, no grouping) and torch's. Measured: 4e-6 and 4e-4; with
    the query heads grouped the wrong way round, 0.45 for both."""
    _need_build()
    from swiftsvd_export.backends.gguf import parity, runtime

    model, ggufs = sharp
    llm = _open(ggufs[layout], kv_f32=False)
    prompt, cont = ids[:300], ids[300:340]
    stepwise = _prefill_then_steps(llm, prompt, cont)
    assert np.abs(stepwise - runtime.logits(llm, prompt + cont)).max() <= 1e-4
    assert np.abs(stepwise - parity.torch_logits(model, prompt + cont)).max() <= 2e-3


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_bytes(tiny, layout):
    """llama.cpp's own K/V buffer sizes equal the rows computed from the ranks:
    (k_K + k_V)/(2·d_kv) of dense for latent-kv."""
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    _open(tiny[3][layout], n_ctx=4096)
    kv = runtime.kv_cache_log()
    row_k = RANK_K if layout == "latent-kv" else D_KV
    row_v = RANK_V if layout != "dense" else D_KV
    mib = kv["layers"] * kv["cells"] * 4 / 2**20  # F32 cache
    assert kv["layers"] == 2 and kv["cells"] >= 4096 and kv["type_k"] == kv["type_v"] == "f32"
    assert abs(kv["k_mib"] - row_k * mib) <= 0.006 and abs(kv["v_mib"] - row_v * mib) <= 0.006, kv
    # the total is (k_K + k_V)/(2·d_kv) of the dense cache's 2·d_kv rows (to the log's 0.01 MiB)
    assert abs(kv["mib"] - (row_k + row_v) * mib) <= 0.006, kv


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["latent-v", "latent-kv"])
def test_flash_attention(tiny, ids, layout):
    """With flash attention on, the latent layers run ggml_flash_attn_ext on the latents (one V head of
    size k_V) and agree with the dense cache under flash attention (F16 K/V inside the kernel)."""
    _need_build()
    from swiftsvd_export.backends.gguf import parity, runtime

    seq = ids[:400]
    want = runtime.logits(_open(tiny[3]["dense"], flash_attn=True), seq)
    got = runtime.logits(_open(tiny[3][layout], flash_attn=True), seq)
    r = parity.compare_logits(want, got)
    assert r["max_abs_dlogit"] <= 1e-2 and r["top1_agreement"] >= 0.99, r


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", LAYOUTS)
def test_context_shift(tiny, ids, layout):
    """Drop the first 100 cached tokens and shift the rest back (llama.cpp's context shift): the next
    logits equal a fresh run over the kept tokens. A latent K is roped at the cells' shifted positions."""
    _need_build()
    from swiftsvd_export.backends.gguf import runtime

    llm = _open(tiny[3][layout])
    import llama_cpp  # bound to the patched library by _open

    seq, drop = ids[:400], 100
    llm.reset()
    llm.eval(seq)
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llama_cpp.llama_memory_can_shift(mem)
    assert llama_cpp.llama_memory_seq_rm(mem, 0, 0, drop)
    llama_cpp.llama_memory_seq_add(mem, 0, drop, len(seq), -drop)
    llm.n_tokens = len(seq) - drop
    llm.input_ids[: llm.n_tokens] = seq[drop:]
    llm.eval(ids[400:401])
    shifted = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    fresh = runtime.logits(llm, seq[drop:] + ids[400:401])[-1]
    assert np.abs(shifted - fresh).max() <= 1e-3


@pytest.mark.llamacpp
def test_layout_without_factor_fails_at_load(tiny, tmp_path, monkeypatch):
    """A layout key on a layer whose v_proj is dense (a hand-made file) fails at load, naming the tensor."""
    _need_build()
    from swiftsvd_export.backends.gguf import runtime, writer

    tok = tiny[2]
    plain = _factorize(make_tiny_llama(seed=5), {"model.layers.0.self_attn.q_proj": 32})
    save_lowrank(plain, tmp_path / "m", dtype="fp32", tokenizer=tok)
    monkeypatch.setattr(writer, "check_kv_cache", lambda *a: 1)
    out = tmp_path / "bad.gguf"
    export_gguf(tmp_path / "m", out, factor_type="f32", quiet=True, kv_cache="latent-v")
    with pytest.raises(SwiftSVDError, match=r"layer 0 caches a latent but 'blk\.0\.attn_v_lr_b\.weight' is absent"):
        runtime.open_model(out, n_ctx=64)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_validate_counts_latent_cache_bytes(tiny, layout):
    """`validate`'s KV figure for a GGUF follows its layout key (F16 cache rows, 2 layers)."""
    from swiftsvd_export.validation.artifacts import discover

    row_k = RANK_K if layout == "latent-kv" else D_KV
    row_v = RANK_V if layout != "dense" else D_KV
    (art,) = discover([tiny[3][layout]])
    assert art.kv_bytes_per_token == 2 * (row_k + row_v) * 2


_LLAMACPP_CHILD = r"""
import json, sys
from pathlib import Path

import numpy as np
from swiftsvd_export.backends.gguf import runtime
ids, extra_bufts = json.loads(sys.argv[1]), sys.argv[2]
if extra_bufts != "default":  # llama.cpp's use_extra_bufts (repacked/AMX weights): llama-cpp-python has no switch
    llama_cpp = runtime.load_llama_cpp()
    default_params = llama_cpp.llama_model_default_params
    def params():
        p = default_params()
        p.use_extra_bufts = extra_bufts == "on"
        return p
    llama_cpp.llama_model_default_params = params
for path in sys.argv[3:]:
    llm = runtime.open_model(path, n_ctx=256, n_threads=2, logits_all=True, n_batch=64, kv_f32=True)
    np.save(f"{path}.{extra_bufts}.npy", runtime.logits(llm, ids))
"""


def _llamacpp_logits(ids: list[int], paths: list[Path], extra_bufts: str = "default") -> dict[Path, np.ndarray]:
    """Each GGUF's logits for ``ids`` from the patched llama.cpp in a child process, so that a ggml abort
    fails the test, not the session; ``extra_bufts`` "on"/"off" sets llama.cpp's repacking buffers."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _LLAMACPP_CHILD, json.dumps(ids), extra_bufts, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, [ln for ln in proc.stderr.splitlines() if "ASSERT" in ln or "rror" in ln] or \
        proc.stderr[-2000:]
    return {p: np.load(f"{p}.{extra_bufts}.npy") for p in paths}


def _tiny_lowrank(folder: Path, ranks: dict[str, int]):
    """The tiny Llama of these llama.cpp tests (d_kv = 2 KV heads x 32), factorized at ``ranks`` and
    saved to ``folder``; returns the torch model."""
    tok = make_tokenizer(folder / "tok")
    model = make_tiny_llama(seed=7, hidden=128)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25.0)
    _factorize(model, ranks)
    save_lowrank(model, folder / "m", dtype="fp32", tokenizer=tok)
    return model


@pytest.mark.llamacpp
def test_q4_0_factors_of_stacked_projections(tmp_path, ids):
    """Q4_0 factors (the phone build) of q/k/v, which share one stacked A, agree with torch under every
    cache layout.

    ggml-cpu repacks 2D Q4_0 weights on AVX2 (Q8_0 too on ARM) into interleaved rows, and its repacked
    kernels read their input rows as contiguous. Two ways that went wrong: a member's rows of the
    stacked A·x are a strided view over several tokens (the patch makes them contiguous; before, the
    dense cache's V was off by 2.3 in the logits), and B_V, applied per KV head as a 3D tensor by a
    latent cache, must not be repacked (the patch loads it 3D; before, ggml aborted). llama.cpp runs
    in a child process, so that an abort fails this test, not the session."""
    from swiftsvd_export.backends.gguf import parity

    _need_build()
    # B_V slices of 32 rows
    model = _tiny_lowrank(tmp_path, {f"model.layers.{i}.self_attn.{p}_proj": 32 for i in range(2) for p in "qkv"})
    seq = ids[:96]
    ref = parity.torch_logits(model, seq)
    paths = {lay: tmp_path / f"{lay}.gguf" for lay in LAYOUTS}
    for lay, path in paths.items():
        export_gguf(tmp_path / "m", path, factor_type="q4_0", embed_type="q8_0", quiet=True, kv_cache=lay)
    _, t = _reader(paths["latent-v"])
    assert t["blk.0.attn_v_lr_b.weight"].tensor_type.name == "Q4_0"
    got = _llamacpp_logits(seq, list(paths.values()))
    for lay, path in paths.items():
        r = parity.compare_logits(ref, got[path])  # Q4_0 rounding: about 0.33 here
        assert r["max_abs_dlogit"] <= 0.6 and r["top1_agreement"] >= 0.99, (lay, r)


def _has_amx() -> bool:
    try:
        return "amx_int8" in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@pytest.mark.llamacpp
@pytest.mark.skipif(not _has_amx(), reason="needs an x86 CPU with AMX (ggml's AMX kernels are built natively)")
def test_amx_kernels_match_the_plain_ones(tmp_path, ids):
    """On a CPU with AMX, ggml-cpu repacks Q4_0/Q8_0 weights for its AMX tile kernels. Three upstream
    bugs broke low-rank GGUFs there (patch 0003): the tile config was miscompiled by GCC 12 (SIGSEGV on
    the first prompt, dense models too), a weight one 32-wide block deep (a rank-32 B) summed into
    uninitialized memory (logits off by ~10), and a latent cache's 3D B_V was repacked as 2D (ggml
    abort). Logits with the extra buffer types must equal those without, to float rounding."""
    from swiftsvd_export.backends.gguf import parity

    _need_build()
    _tiny_lowrank(tmp_path, {f"model.layers.{i}.{m}": 32 for i in range(2)
                             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")})
    paths = [tmp_path / f"{t}-{lay}.gguf" for t in ("q8_0", "q4_0") for lay in ("dense", "latent-v")]
    for p in paths:
        t, lay = p.stem.split("-", 1)
        export_gguf(tmp_path / "m", p, factor_type=t, embed_type="q8_0", quiet=True, kv_cache=lay)
    amx, plain = (_llamacpp_logits(ids[:96], paths, extra_bufts=e) for e in ("on", "off"))
    for p in paths:
        r = parity.compare_logits(plain[p], amx[p])
        assert r["max_abs_dlogit"] <= 1e-3 * np.abs(plain[p]).max() and r["top1_agreement"] == 1.0, (p.name, r)
