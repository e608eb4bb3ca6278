"""Layer streaming (compress --stream / --max-memory): same output as in memory, sharded and GGUF
sources, the output loads and exports, and the memory-limit errors."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftsvd_export import load
from swiftsvd_export.compress import CompressConfig, compress
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export import memory_budget
from swiftsvd_export.streaming import compress_streaming

from .conftest import make_tiny_llama, make_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTSVD_CACHE", str(tmp_path / "cache"))


def _cfg(model, out, calib, **kw):
    base = dict(nsamples=8, seqlen=48, batch_size=4, progress=False, dtype="fp32", calib=str(calib), ratio=0.4)
    base.update(kw)
    return CompressConfig(model=str(model), output=str(out), **base)


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ra = json.loads((a / "config.json").read_text())["swiftsvd"]["ranks"]
    assert ra == json.loads((b / "config.json").read_text())["swiftsvd"]["ranks"] and ra


def _force_spill(monkeypatch):
    real = memory_budget.plan

    def spilling(*a, **kw):
        p = real(*a, **kw)
        p.spill = True
        return p
    monkeypatch.setattr(memory_budget, "plan", spilling)


@pytest.mark.parametrize("allocation,spill", [("uniform", False), ("dynamic", True)])
def test_streaming_equals_in_memory(tiny_model_dir, calib_txt, tmp_path, monkeypatch, allocation, spill):
    mem, st = tmp_path / "mem", tmp_path / "st"
    s_mem = compress(_cfg(tiny_model_dir, mem, calib_txt, allocation=allocation, cache=False))
    if spill:
        _force_spill(monkeypatch)
    s_st = compress_streaming(_cfg(tiny_model_dir, st, calib_txt, allocation=allocation, cache=False))
    assert s_st["streaming"]["activations"] == ("disk" if spill else "ram")
    _same_weights(mem, st)
    assert s_st["normalized_reconstruction_error"] == pytest.approx(s_mem["normalized_reconstruction_error"], rel=1e-12)
    m_mem, m_st = json.loads((mem / "manifest.json").read_text()), json.loads((st / "manifest.json").read_text())
    assert m_st["block_importance"] == m_mem["block_importance"]
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(mem)(ids).logits, load(st)(ids).logits)
    assert not list((tmp_path / "cache" / "tmp").glob("*"))  # spilled activations and bases removed


def test_short_last_batch(tiny_model_dir, calib_txt, tmp_path):
    """--nsamples not a multiple of --batch-size: the blocks get masks that broadcast over any batch."""
    mem, st = tmp_path / "mem", tmp_path / "st"
    compress(_cfg(tiny_model_dir, mem, calib_txt, nsamples=10, batch_size=4, cache=False))
    compress_streaming(_cfg(tiny_model_dir, st, calib_txt, nsamples=10, batch_size=4, cache=False))
    _same_weights(mem, st)


def test_sharded_source_and_stats_cache_shared_with_in_memory(calib_txt, tmp_path):
    one, shards = tmp_path / "one", tmp_path / "shards"
    model = make_tiny_llama(seed=1, layers=3)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    for d, size in ((one, "100MB"), (shards, "40KB")):
        make_tokenizer(d)
        model.save_pretrained(d, safe_serialization=True, max_shard_size=size)
    assert (shards / "model.safetensors.index.json").is_file() and len(list(shards.glob("*.safetensors"))) > 3
    compress(_cfg(one, tmp_path / "mem", calib_txt))  # writes the statistics cache for `one`
    s = compress_streaming(_cfg(one, tmp_path / "hit", calib_txt))
    assert s["choice"]["stats_cache"] == "hit"
    compress_streaming(_cfg(shards, tmp_path / "sh", calib_txt, cache=False))
    _same_weights(tmp_path / "mem", tmp_path / "hit")
    _same_weights(tmp_path / "mem", tmp_path / "sh")
    assert "lm_head.weight" in load_file(str(tmp_path / "sh" / "model.safetensors"))


def test_gguf_source_and_exports_of_the_output(tiny_model_dir, calib_txt, tmp_path):
    from swiftsvd_export.backends.gguf.writer import export_gguf

    gguf = tmp_path / "dense-f32.gguf"
    export_gguf(tiny_model_dir, gguf, factor_type="f32", embed_type="f32", quiet=True)
    compress_streaming(_cfg(tiny_model_dir, tmp_path / "st", calib_txt))
    s = compress_streaming(_cfg(gguf, tmp_path / "g", calib_txt))
    assert s["choice"]["stats_cache"] == "off"
    _same_weights(tmp_path / "st", tmp_path / "g")
    # the streamed folder is an ordinary compressed folder for the GGUF and ONNX exporters
    summary = export_gguf(tmp_path / "st", tmp_path / "lr.gguf", factor_type="f16", quiet=True)
    assert summary.n_lowrank == 14
    from swiftsvd_export.backends.onnx.export import export_onnx
    from swiftsvd_export.backends.onnx.parity import parity

    export_onnx(tmp_path / "st", tmp_path / "onnx")
    r = parity(load(tmp_path / "st"), tmp_path / "onnx", [[1, 20, 33, 7, 99]], gen_tokens=8)
    assert r["passed"], r


def test_max_memory_below_one_block_names_the_minimum(tiny_model_dir, calib_txt, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(SwiftSVDError, match=r"below the .* GiB this model needs .* give at least --max-memory"):
        compress_streaming(_cfg(tiny_model_dir, out, calib_txt), max_memory="50MB")
    assert not out.exists()


def test_peak_over_the_limit_fails_and_writes_nothing(tiny_model_dir, calib_txt, tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = memory_budget.rss_bytes
    calls = {"n": 0}

    def fake():  # the real values while planning, then a peak far above the limit
        calls["n"] += 1
        now, peak = real()
        return (now, peak) if calls["n"] == 1 else (now, 10**15)
    monkeypatch.setattr(memory_budget, "rss_bytes", fake)
    with pytest.raises(SwiftSVDError, match="went over --max-memory"):
        compress_streaming(_cfg(tiny_model_dir, out, calib_txt), max_memory="1TB")
    assert not out.exists()


@pytest.mark.parametrize("text,value", [("8GB", 8 * 10**9), ("7.5GiB", int(7.5 * 2**30)), ("512mb", 512 * 10**6),
                                        ("1000", 1000)])
def test_parse_size(text, value):
    assert memory_budget.parse_size(text) == value


@pytest.mark.parametrize("text", ["8 apples", "GB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(SwiftSVDError, match="--max-memory"):
        memory_budget.parse_size(text)


def test_unsupported_options_are_refused(tiny_model_dir, calib_txt, tmp_path):
    with pytest.raises(SwiftSVDError, match="--sequential is not available with layer streaming"):
        compress_streaming(_cfg(tiny_model_dir, tmp_path / "o", calib_txt, sequential=True))


def test_cli_max_memory_too_small_is_one_line(tiny_model_dir, calib_txt, tmp_path, capsys):
    from swiftsvd_export.cli import main

    out = tmp_path / "o"
    code = main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--calib", str(calib_txt),
                 "--nsamples", "8", "--seqlen", "48", "--max-memory", "50MB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("swiftsvd-export compress: error: --max-memory 0.05 GiB is below")
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
