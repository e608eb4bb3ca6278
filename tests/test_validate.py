"""``validate``: bandwidth probe, byte figures, parity/quality/speed report on tiny exports, the report
contract (schema.json), atomic output and one-line errors.

A tiny random low-rank Llama is exported here to ONNX (fp32) and GGUF (f32); tests marked
``llamacpp`` need the patched libllama (``swiftsvd-export build-llamacpp``).
"""
from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch

from swiftsvd_export.cli import main
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.lowrank import LowRankLinear, replace_module, save_lowrank
from swiftsvd_export.validation import ValidateOptions, run_validation
from swiftsvd_export.validation import artifacts as art_mod
from swiftsvd_export.validation import bandwidth, parity, quality, report as report_mod, schema
from swiftsvd_export.validation.plots import PLOTS

from .conftest import WIKI_TEST, make_tiny_llama, make_tokenizer

RANKS = {"self_attn.q_proj": 16, "self_attn.o_proj": 16, "mlp.up_proj": 32, "mlp.down_proj": 32}
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # make_tiny_llama: hidden 64, 4 heads, 2 kv heads
FAST = dict(context=24, threads=[1], repeats=1, decode_tokens=8, ppl_windows=2, seqlen=64,
            probe_bytes=4 * 2**20, probe_reps=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(low-rank folder, ONNX fp32 folder, GGUF f32 path, torch model) of one tiny random Llama."""
    from swiftsvd_export.backends.gguf.writer import export_gguf
    from swiftsvd_export.backends.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("validate")
    lr = root / "tiny-lr"
    tok = make_tokenizer(lr)
    model = make_tiny_llama(seed=3)
    with torch.no_grad():  # sharper logits than the 0.02 init, so top-1 is well defined
        model.model.embed_tokens.weight.mul_(25.0)
    for i in range(LAYERS):
        for name, k in RANKS.items():
            full = f"model.layers.{i}.{name}"
            W = model.get_submodule(full).weight.detach().double()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            replace_module(model, full, LowRankLinear.from_factors(Vh[:k].float(), (U[:, :k] * S[:k]).float()))
    save_lowrank(model, lr, dtype="fp32", tokenizer=tok, manifest={"method": "svd (test)"})
    onnx_dir = root / "tiny-onnx"
    export_onnx(lr, onnx_dir)
    gguf_path = root / "tiny-f32.gguf"
    export_gguf(lr, gguf_path, factor_type="f32", embed_type="f32", quiet=True)
    return lr, onnx_dir, gguf_path, model.eval()


@pytest.fixture(scope="module")
def torch_onnx_report(tiny, tmp_path_factory):
    lr, onnx_dir, _, _ = tiny
    out = tmp_path_factory.mktemp("reports") / "torch-onnx"
    return run_validation([lr, onnx_dir], out, ValidateOptions(**FAST)), out


def test_bandwidth_probe_is_plausible():
    nbytes = 64 * 2**20
    r = bandwidth.probe(nbytes, reps=3)
    assert r["copy_gbps"] > 0 and r["triad_gbps"] > 0 and r["array_bytes"] == nbytes and r["reps"] == 3
    a, b = np.ones(nbytes // 8), np.zeros(nbytes // 8)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    own = 2 * nbytes / best / 1e9
    assert 0.3 * own <= r["copy_gbps"] <= 5 * own, (r, own)
    assert 0.2 * own <= r["triad_gbps"] <= 5 * own, (r, own)


def test_byte_figures(tiny):
    lr, onnx_dir, gguf_path, model = tiny
    emb = model.model.embed_tokens.weight
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    t = art_mod.torch_artifact(lr)
    # tied head: the embedding is read in full once (as the head) plus one row for the input
    assert t.weight_bytes_per_token == 4 * (params + emb.numel() + emb.shape[1])
    assert t.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    assert (t.kind, t.variant, t.file_bytes) == ("torch", "fp32", (lr / "model.safetensors").stat().st_size)
    (o,) = art_mod.discover([onnx_dir])
    assert (o.kind, o.variant, o.model_file) == ("onnx", "fp32", "model.onnx")
    assert o.kv_bytes_per_token == t.kv_bytes_per_token
    assert abs(o.weight_bytes_per_token / t.weight_bytes_per_token - 1) < 0.02
    g = art_mod.gguf_artifact(gguf_path)
    assert (g.kind, g.variant) == ("gguf", "f32")
    assert g.kv_bytes_per_token == 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # F16 cache
    assert abs(g.weight_bytes_per_token / t.weight_bytes_per_token - 1) < 0.02


def test_torch_and_onnx_report(tiny, torch_onnx_report):
    lr, onnx_dir, _, model = tiny
    rep, out = torch_onnx_report
    schema.check(rep)
    assert json.loads((out / "report.json").read_text()) == rep
    assert "## Parity against the reference" in (out / "report.md").read_text()
    for png in PLOTS:
        assert (out / png).stat().st_size > 1000
    assert rep["complete"] is True and rep["reference"]["path"] == str(lr)
    t, o = rep["artifacts"]
    assert t["parity"] is None and t["kind"] == "torch" and o["kind"] == "onnx"
    p = o["parity"]
    assert p["top1_agreement"] == 1.0 and p["max_abs_dlogit"] < 1e-3 and p["kl_mean"] < 1e-6, p
    assert p["greedy_match_len"] == p["greedy_tokens"] == FAST["decode_tokens"]
    assert p["prompts"] == len(parity.BUILTIN_PROMPTS) + 1
    # the same windows in every runtime, and the same protocol as `swiftsvd-export ppl`
    from swiftsvd_export.perplexity import perplexity
    from transformers import AutoTokenizer

    ref = perplexity(model, AutoTokenizer.from_pretrained(lr), WIKI_TEST.read_text(encoding="utf-8")[:20000],
                     seqlen=FAST["seqlen"], max_windows=FAST["ppl_windows"], progress=False)
    assert t["quality"]["tokens_scored"] == ref["tokens_scored"] == o["quality"]["tokens_scored"]
    assert t["quality"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert o["quality"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
    assert rep["reference"]["ppl"] == t["quality"]["ppl"]
    for a in (t, o):
        sp = a["speed"]["by_threads"]["1"]
        assert sp["prefill_tps"] > 0 and sp["decode_tps"] > 0 and a["speed"]["repeats"] == 1
        assert a["memory"]["peak_rss_bytes"] > 20 * 2**20
        assert a["memory"]["kv_bytes_at_context"] == a["memory"]["kv_bytes_per_token"] * FAST["context"]
        bw = a["bandwidth"]
        expect = (a["memory"]["weight_bytes_per_token"] + a["memory"]["kv_bytes_at_context"]) * sp["decode_tps"] / 1e9
        assert bw["achieved_gbps"] == pytest.approx(expect)
        assert bw["utilisation"] == pytest.approx(expect / rep["bandwidth_probe"]["triad_gbps"])


@pytest.mark.llamacpp
def test_gguf_report(tiny, tmp_path):
    lr, _, gguf_path, _ = tiny
    rep = run_validation([gguf_path], tmp_path / "r", ValidateOptions(**FAST), reference=lr)
    schema.check(rep)
    (g,) = rep["artifacts"]
    p = g["parity"]
    assert g["kind"] == "gguf" and g["variant"] == "f32"
    assert p["top1_agreement"] == 1.0 and p["max_abs_dlogit"] < 2e-2, p
    assert p["greedy_match_len"] == p["greedy_tokens"]
    assert g["quality"]["ppl"] == pytest.approx(rep["reference"]["ppl"], rel=1e-3)
    assert g["speed"]["by_threads"]["1"]["decode_tps"] > 0
    for png in PLOTS:
        assert (tmp_path / "r" / png).is_file()


def test_schema_checker_without_jsonschema(torch_onnx_report):
    rep, _ = torch_onnx_report
    assert schema.check_minimal(rep) == []
    bad = copy.deepcopy(rep)
    del bad["machine"]["cpu"]
    bad["artifacts"][1]["parity"]["top1_agreement"] = 1.5
    bad["artifacts"][0]["speed"]["by_threads"]["x"] = {"prefill_tps": 1.0, "decode_tps": 1.0}
    bad["artifacts"][0]["extra"] = 1
    bad["settings"]["threads"] = [True]
    errors = " ".join(schema.check_minimal(bad))
    for what in ("missing 'cpu'", "1.5 > 1", "'x' does not match", "unexpected property 'extra'", "True is not"):
        assert what in errors, errors
    with pytest.raises(schema.ReportSchemaError):
        schema.check(bad)


def test_interrupted_write_leaves_nothing(torch_onnx_report, tmp_path, monkeypatch):
    rep, _ = torch_onnx_report

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_plots", boom)
    with pytest.raises(KeyboardInterrupt):
        report_mod.write_report(rep, tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_eval_ids_prefix_equals_full_tokenization(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny[0])
    full = tok(WIKI_TEST.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert quality.eval_ids(tok, WIKI_TEST, 3000) == full[:3000]
    assert quality.n_windows(full[:3000], 512, 0) == 5 and quality.n_windows(full[:3000], 512, 2) == 2


def test_match_len():
    assert parity.match_len([1, 2, 3], [1, 2, 3], 8) == 8  # identical, stopped at the same EOS
    assert parity.match_len([1, 2, 3], [1, 5, 3], 3) == 1
    assert parity.match_len([1, 2, 3], [1, 2], 3) == 2


@pytest.mark.parametrize("case", ["missing", "text-file", "empty-dir", "no-reference"])
def test_bad_artifacts_are_one_line_errors(case, tiny, tmp_path, capsys):
    path = {"missing": tmp_path / "nope", "text-file": tmp_path / "notes.txt", "empty-dir": tmp_path / "empty",
            "no-reference": tiny[1]}[case]
    if case == "text-file":
        path.write_text("hello")
    if case == "empty-dir":
        path.mkdir()
    out = tmp_path / "report"
    assert main(["validate", str(path), "--out", str(out), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("swiftsvd-export validate: error:")
    assert (str(path) in err) if case != "no-reference" else ("--reference" in err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


def test_existing_report_needs_overwrite(tiny, tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(SwiftSVDError, match="already exists"):
        run_validation([tiny[0]], tmp_path / "r", ValidateOptions(**FAST))


def test_release_folder_stands_for_its_artifacts(tiny, tmp_path):
    lr, onnx_dir, gguf_path, _ = tiny
    for p in (lr, onnx_dir, gguf_path):
        (tmp_path / p.name).symlink_to(p)
    (tmp_path / "notes").mkdir()  # not an artifact: skipped inside a release folder
    found = art_mod.discover([tmp_path])
    assert [(a.name, a.kind) for a in found] == [("tiny-f32.gguf", "gguf"), ("tiny-lr", "torch"),
                                                ("tiny-onnx", "onnx")]
