"""``release`` / ``run``: strict config, profiles, the threshold gate, JUnit, and the atomic pipeline.

The gate and JUnit tests run on hand-built report dicts (the report.json contract of
``validate``); the pipeline tests run the whole chain (compress -> export -> validate -> gate) on
the tiny random Llama of conftest.py with small validation settings.
"""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from swiftsvd_export.cli import main
from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.latent_kv import default_layout
from swiftsvd_export.release import pipeline
from swiftsvd_export.release.config import load_config
from swiftsvd_export.release.gate import Thresholds, evaluate, failures, table
from swiftsvd_export.release.junit import junit_xml
from swiftsvd_export.release.profiles import available

PROFILES = ["laptop-x86-llamacpp-f16", "laptop-x86-llamacpp-q8", "laptop-x86-onnx-fp16",
            "laptop-x86-onnx-fp32", "phone-arm64-llamacpp-q4", "phone-arm64-onnx-int8"]


# ------------------------------------------------------------------------ gate on hand-built reports

def _artifact(path: str, name: str, **over) -> dict:
    art = {"name": name, "kind": "onnx", "path": path, "variant": "fp32", "file_bytes": 100_000_000,
           "parity": {"max_abs_dlogit": 0.5, "top1_agreement": 0.9, "kl_mean": 0.02, "greedy_match_len": 12,
                      "greedy_tokens": 16},
           "quality": {"ppl": 36.0, "tokens_scored": 4096, "seqlen": 512, "windows": 8},
           "memory": {"peak_rss_bytes": 400_000_000, "weight_bytes_per_token": 90_000_000,
                      "kv_bytes_per_token": 30_000, "kv_bytes_at_context": 15_000_000},
           "speed": {"repeats": 3, "by_threads": {"1": {"prefill_tps": 300.0, "decode_tps": 40.0},
                                                  "2": {"prefill_tps": 500.0, "decode_tps": 30.0}}},
           "bandwidth": {"threads": 1, "achieved_gbps": 3.6, "utilisation": 0.3, "basis": "triad"}}
    for k, v in over.items():
        art[k] = v
    return art


def _report(*artifacts: dict, ref_ppl: float = 30.0) -> dict:
    return {"schema_version": 1, "complete": True, "machine": {}, "bandwidth_probe": {"copy_gbps": 12.0},
            "settings": {}, "reference": {"path": "smollm2-135m", "kind": "torch", "ppl": ref_ppl},
            "artifacts": list(artifacts)}


def test_gate_pass_and_one_line_per_miss(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b.gguf")
    report = _report(_artifact(a, "a"), _artifact(b, "b.gguf", file_bytes=50_000_000))
    ok = Thresholds(max_file_bytes=200_000_000, max_ppl_increase=25.0, min_top1_agreement=0.85,
                    min_decode_tps=35.0, max_peak_rss_bytes=500_000_000, min_greedy_match_len=8)
    strict = Thresholds(max_file_bytes=1, max_ppl_increase=10.0, min_decode_tps=35.0)
    checks = evaluate(report, [("laptop", a, ok), ("tiny", b, strict)])
    assert len(checks) == 6 + 3
    assert all(c.passed for c in checks[:6])
    lines = failures(checks)
    assert len(lines) == 2
    assert lines[0].startswith("FAIL tiny: max_file_bytes = 1: measured 50,000,000 > 1")
    assert lines[1].startswith("FAIL tiny: max_ppl_increase = +10.00 %: measured +20.00 %")
    text = table(checks)
    assert text.splitlines()[0].split() == ["target", "threshold", "limit", "measured", "result"]
    assert text.count("FAIL") == 2 and text.count("pass") == 7


def test_gate_speed_threads_and_lower_bounds(tmp_path):
    a = str(tmp_path / "a")
    report = _report(_artifact(a, "a"))
    # default: the smallest measured thread count (1: 40 tok/s); speed_threads = 2 picks 30 tok/s
    assert evaluate(report, [("t", a, Thresholds(min_decode_tps=35.0))])[0].passed
    c = evaluate(report, [("t", a, Thresholds(min_decode_tps=35.0, speed_threads=2))])[0]
    assert not c.passed and "measured 30 < 35" in c.detail
    c = evaluate(report, [("t", a, Thresholds(min_decode_tps=35.0, speed_threads=4))])[0]
    assert not c.passed and "not measured" in c.detail and "by_threads.4" in c.detail


def test_gate_fails_closed_on_missing_metrics(tmp_path):
    a = str(tmp_path / "a")
    report = _report(_artifact(a, "a", parity=None, quality=None))
    checks = evaluate(report, [("t", a, Thresholds(min_top1_agreement=0.5, max_ppl=100.0)),
                               ("gone", str(tmp_path / "nope"), Thresholds(max_file_bytes=10))])
    assert [c.passed for c in checks] == [False, False, False]
    assert [c.threshold for c in checks[:2]] == ["max_ppl", "min_top1_agreement"]  # declaration order
    assert "quality not in the report" in checks[0].detail
    assert "parity not in the report" in checks[1].detail
    assert "no artifact" in checks[2].detail
    report["reference"]["ppl"] = None
    report["artifacts"][0]["quality"] = {"ppl": 40.0}
    c = evaluate(report, [("t", a, Thresholds(max_ppl_increase=50.0))])[0]
    assert not c.passed and "dense" in c.detail


def test_gate_worst_graph_of_an_onnx_folder_decides(tmp_path):
    """A phone export folder holds model.onnx and model.ort: both are gated, the worst decides."""
    a = str(tmp_path / "phone")
    report = _report(_artifact(a, "phone:int8", file_bytes=60), _artifact(a, "phone:ort", file_bytes=80))
    checks = evaluate(report, [("phone", a, Thresholds(max_file_bytes=70, min_top1_agreement=0.8))])
    assert len(checks) == 2
    assert not checks[0].passed and "(phone:ort)" in checks[0].detail
    assert checks[1].passed


def test_junit_counts(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    report = _report(_artifact(a, "a"), _artifact(b, "b"))
    checks = evaluate(report, [("a", a, Thresholds(max_file_bytes=1, max_ppl=100.0, min_decode_tps=1e6)),
                               ("b", b, Thresholds(max_ppl=100.0, max_kl_mean=1.0))])
    root = ET.fromstring(junit_xml(checks, "release.x"))
    cases = root.findall(".//testcase")
    assert len(cases) == 5 and int(root.get("tests")) == 5
    assert len(root.findall(".//testcase/failure")) == 2 and int(root.get("failures")) == 2
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert suites["release.x.a"].get("failures") == "2" and suites["release.x.b"].get("failures") == "0"
    fail = suites["release.x.a"].find("testcase/failure")
    assert "max_file_bytes" in fail.get("message") and fail.get("message").startswith("FAIL a:")


# ------------------------------------------------------------------------ config and profiles

def _write(tmp_path: Path, body: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


BASE = 'model = "smollm2-135m"\n[compress]\nratio = 0.4\n'


@pytest.mark.parametrize("body,needles", [
    (BASE + 'ratoi = 0.3\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n',
     ["[compress] unknown key 'ratoi'", "did you mean 'ratio'"]),
    ('model = "smollm2-135m"\n[compress]\nratio = "0.4"\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n',
     ["[compress] ratio: expected a number, got string '0.4'"]),
    (BASE + '[validate]\nthreads = 2\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n',
     ["[validate] threads: expected a list of integers, got integer 2"]),
    (BASE + '[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n[targets.thresholds]\nmax_file_bytes = "1 GB"\n',
     ["[targets.0.thresholds] max_file_bytes: expected an integer, got string '1 GB'"]),
    (BASE + '[thresholds]\nmin_decode_tps = true\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n',
     ["[thresholds] min_decode_tps: expected a number, got boolean True"]),
    (BASE + 'colour = "red"\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n', ["unknown key 'colour'"]),
    (BASE, ["missing key 'targets'"]),
    (BASE + '[[targets]]\nprofile = "laptop-x86-llamacpp-q8"\n',
     ["target 'laptop-x86-llamacpp-q8'", "rank_multiple = 32"]),
    (BASE + '[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n',
     ["used twice"]),
    ('model = "smollm2-135m"\n[[targets]]\nprofile = "laptop-x86-onnx-fp32"\n', ["give exactly one of ratio"]),
    ('model = "smollm2-135m"\n[compress\n', ["not valid TOML"]),
])
def test_config_errors_are_one_line(tmp_path, capsys, body, needles):
    path = _write(tmp_path, body)
    with pytest.raises(SwiftSVDError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    for n in needles:
        assert n in msg, msg
    assert main(["release", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("swiftsvd-export release: error: ")


def test_unknown_profile_lists_the_available_ones(tmp_path):
    assert available() == PROFILES
    path = _write(tmp_path, BASE + '[[targets]]\nprofile = "laptop-arm-mlx"\n')
    with pytest.raises(SwiftSVDError, match="unknown profile 'laptop-arm-mlx'; available profiles: "
                                            + ", ".join(PROFILES)):
        load_config(path)


def test_profile_files_are_strict(tmp_path):
    _write(tmp_path, 'description = "x"\nformat = "onnx"\n[export]\nquantize = "int3"\n', "p.toml")
    with pytest.raises(SwiftSVDError, match=r"p.toml: \[export\] quantize: expected one of 'none', 'int8', 'int4'"):
        load_config(_write(tmp_path, BASE + '[[targets]]\nprofile = "p.toml"\n'))
    _write(tmp_path, 'description = "x"\nformat = "gguf"\n[export]\nprecision = "fp16"\n', "p.toml")
    with pytest.raises(SwiftSVDError, match=r"\[export\] unknown key 'precision'"):
        load_config(_write(tmp_path, BASE + '[[targets]]\nprofile = "p.toml"\n'))
    _write(tmp_path, 'description = "x"\nformat = "onnx"\n[export]\ngraph = "optimum"\nkv_cache = "latent-v"\n',
           "p.toml")
    with pytest.raises(SwiftSVDError, match=r"p.toml: \[export\] a latent-v cache needs the traced graph"):
        load_config(_write(tmp_path, BASE + '[[targets]]\nprofile = "p.toml"\n'))
    _write(tmp_path, 'description = "x"\nformat = "onnx"\n[export]\nquantize = "int8"\naccuracy_level = 3\n', "p.toml")
    with pytest.raises(SwiftSVDError, match=r"p.toml: \[export\] --accuracy-level 3: choose 4"):
        load_config(_write(tmp_path, BASE + '[[targets]]\nprofile = "p.toml"\n'))


def test_config_merges_thresholds_and_resolves_paths(tmp_path):
    (tmp_path / "calib.txt").write_text("hello")
    path = _write(tmp_path, 'model = "smollm2-135m"\n[compress]\nratio = 0.4\nrank_multiple = 32\n'
                            'calib = "calib.txt"\n[validate]\nthreads = [1, 2]\ntext = "calib.txt"\n'
                            '[thresholds]\nmax_ppl_increase = 50\nmin_decode_tps = 10\n'
                            '[[targets]]\nprofile = "laptop-x86-llamacpp-q8"\n[targets.thresholds]\n'
                            'min_decode_tps = 20.5\n[[targets]]\nprofile = "phone-arm64-onnx-int8"\nname = "phone"\n')
    cfg = load_config(path)
    assert cfg.compress["calib"] == str(tmp_path / "calib.txt")
    assert cfg.validate_options().text == tmp_path / "calib.txt" and cfg.validate_options().threads == [1, 2]
    q8, phone = cfg.targets
    assert q8.thresholds.limits() == {"max_ppl_increase": 50.0, "min_decode_tps": 20.5}
    assert phone.name == "phone" and phone.thresholds.min_decode_tps == 10.0
    assert phone.profile.export == {"precision": "fp32", "quantize": "int8", "accuracy_level": 4, "mobile": True}
    assert cfg.needs_llamacpp and cfg.compress_config(tmp_path / "o").rank_multiple == 32


def test_shipped_default_config_loads():
    from swiftsvd_export.commands.run import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model == "smollm2-135m" and 0 < cfg.compress["ratio"] < 1
    assert cfg.compress_config(Path("o")).sequential
    assert {t.profile.format for t in cfg.targets} == {"onnx", "gguf"}
    assert all(t.thresholds.limits() for t in cfg.targets)


@pytest.mark.parametrize("command", ["release", "run"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"swiftsvd-export {command}" in out


# ------------------------------------------------------------------------ the pipeline on a tiny model

def _tiny_config(tmp_path: Path, model: Path, calib: Path, targets: str, thresholds: str = "") -> Path:
    return _write(tmp_path, f'''name = "tiny"
model = "{model}"
[compress]
ratio = 0.5
rank_multiple = 32
calib = "{calib}"
nsamples = 8
seqlen = 64
cache = false
[validate]
threads = [1]
repeats = 1
context = 64
decode_tokens = 4
ppl_windows = 2
seqlen = 64
probe_bytes = 8_000_000
probe_reps = 1
[thresholds]
{thresholds}
{targets}''', "release.toml")


ONNX_TARGET = '[[targets]]\nprofile = "laptop-x86-onnx-fp32"\nname = "onnx"\n'
SATISFIABLE = ("max_file_bytes = 50_000_000\nmax_ppl_increase = 1000.0\nmax_peak_rss_bytes = 8_000_000_000\n"
               "min_decode_tps = 1.0\nmin_top1_agreement = 0.0\n")


def _verify_checksums(folder: Path) -> None:
    lines = (folder / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files
    for rel, digest in listed.items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest, rel


def test_release_passes_then_an_impossible_threshold_fails(tmp_path, capsys, tiny_model_dir, calib_txt):
    out = tmp_path / "rel"
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, ONNX_TARGET, SATISFIABLE)
    assert main(["release", str(cfg), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "gate passed: 5 checks" in stdout and f"report: {out / 'validation' / 'report.md'}" in stdout
    for rel in ("release.toml", "model/model.safetensors", "artifacts/onnx/model.onnx", "validation/report.json",
                "validation/report.md", "release.json", "junit.xml"):
        assert (out / rel).is_file(), rel
    _verify_checksums(out)
    release = json.loads((out / "release.json").read_text())
    assert release["gate"]["passed"] and release["targets"][0]["artifact"] == "artifacts/onnx"
    report = json.loads((out / "validation" / "report.json").read_text())
    assert report["artifacts"][0]["path"] == "artifacts/onnx"  # relative to the moved folder
    # the product default: the V-latent cache exactly when v_proj is factorized in every layer
    summary = json.loads((out / "artifacts/onnx/summary.json").read_text())
    assert summary["kv_cache"]["layout"] == default_layout(summary["ranks"], summary["num_hidden_layers"])
    assert str(tmp_path / ".rel") not in (out / "validation" / "report.md").read_text()
    root = ET.parse(out / "junit.xml").getroot()
    assert len(root.findall(".//testcase")) == 5 and not root.findall(".//failure")

    # Same release with an impossible file size: exit 1, the miss named; replaces the previous
    # release folder without --overwrite (it is one), and leaves no temporary folder.
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, ONNX_TARGET, SATISFIABLE.replace("50_000_000", "1"))
    assert main(["release", str(cfg), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAIL onnx: max_file_bytes = 1: measured" in captured.out
    assert "gate failed: 1 of 5 checks missed" in captured.err
    root = ET.parse(out / "junit.xml").getroot()
    assert len(root.findall(".//testcase")) == 5 and len(root.findall(".//failure")) == 1
    assert not json.loads((out / "release.json").read_text())["gate"]["passed"]
    assert not list(tmp_path.glob(".rel*"))


def test_interrupted_release_leaves_no_folder(tmp_path, capsys, monkeypatch, tiny_model_dir, calib_txt):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_target", boom)
    out = tmp_path / "rel"
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, ONNX_TARGET, SATISFIABLE)
    assert main(["release", str(cfg), "--out", str(out)]) == 130
    assert not out.exists() and not list(tmp_path.glob(".rel*"))


def test_existing_folder_that_is_not_a_release_is_kept(tmp_path, capsys, tiny_model_dir, calib_txt):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, ONNX_TARGET, SATISFIABLE)
    assert main(["release", str(cfg), "--out", str(out)]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.llamacpp
def test_release_gguf_target(tmp_path, capsys, tiny_model_dir, calib_txt):
    pipeline.check_llamacpp()
    out = tmp_path / "rel"
    target = '[[targets]]\nprofile = "laptop-x86-llamacpp-q8"\nname = "q8"\n'
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, target, SATISFIABLE)
    assert main(["release", str(cfg), "--out", str(out)]) == 0, capsys.readouterr()
    assert (out / "artifacts" / "q8.gguf").is_file()
    _verify_checksums(out)
    assert "gate passed: 5 checks" in capsys.readouterr().out


def test_release_gguf_q4_profile_is_importance_weighted(tmp_path, capsys, tiny_model_dir, calib_txt):
    """The shipped 4-bit phone profile gets its Q4_0 tensors weighted by the release's own
    calibration text; the release record says so."""
    pipeline.check_llamacpp()
    out = tmp_path / "rel"
    target = '[[targets]]\nprofile = "phone-arm64-llamacpp-q4"\nname = "q4"\n'
    cfg = _tiny_config(tmp_path, tiny_model_dir, calib_txt, target, SATISFIABLE)
    assert main(["release", str(cfg), "--out", str(out)]) == 0, capsys.readouterr()
    export = json.loads((out / "release.json").read_text())["targets"][0]["export"]
    assert export["importance_weighted_tensors"] > 0
    assert export["importance"].endswith(f"tokens of {calib_txt.name}"), export
