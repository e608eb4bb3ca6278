"""Bad input: one line naming the problem, a non-zero exit, and no output folder left behind."""
import json

import numpy as np
import pytest

from swiftsvd_export.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_clean_failure(code, err, out_dir, *needles):
    assert code != 0
    assert len(err) >= 1 and err[-1].startswith("swiftsvd-export ")
    for n in needles:
        assert n in err[-1], err[-1]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*"))


def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(tmp_path / "nope"), str(out), "--ratio", "0.4")
    _assert_clean_failure(code, err, out, "does not exist")


def test_corrupt_and_truncated_gguf(capsys, tmp_path):
    import gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(bad), str(out), "--ratio", "0.4")
    _assert_clean_failure(code, err, out, "corrupt or truncated GGUF")

    good = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    data = good.read_bytes()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) - 1000])
    code, err = _run(capsys, "compress", str(trunc), str(out), "--ratio", "0.4")
    _assert_clean_failure(code, err, out, "corrupt or truncated GGUF")

    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world, not a model")
    code, err = _run(capsys, "compress", str(notgguf), str(out), "--ratio", "0.4")
    _assert_clean_failure(code, err, out, "not a GGUF")


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(d)
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(d), str(out), "--ratio", "0.4")
    _assert_clean_failure(code, err, out, "unsupported architecture 'gpt2'", "supported: ", "llama", "phi3")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_out_of_range(capsys, tmp_path, tiny_model_dir, ratio):
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", ratio)
    _assert_clean_failure(code, err, out, "--ratio must be in (0, 1)")


def test_empty_and_short_calibration(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--calib", str(empty))
    _assert_clean_failure(code, err, out, "is empty")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "only a few words here"}) + "\n")
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--calib", str(short),
                     "--nsamples", "4", "--seqlen", "64")
    _assert_clean_failure(code, err, out, "tokens, fewer than nsamples x seqlen = 4 x 64 = 256")


def test_existing_output_refused(capsys, tmp_path, tiny_model_dir, calib_txt):
    out = tmp_path / "exists"
    out.mkdir()
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--calib", str(calib_txt))
    assert code != 0 and "already exists" in err[-1]


def test_cli_compress_and_ppl(capsys, tmp_path, tiny_model_dir, calib_txt):
    from .conftest import WIKI_TEST

    out = tmp_path / "c"
    code = main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.3", "--calib", str(calib_txt),
                 "--nsamples", "4", "--seqlen", "64", "--json", "--rank-multiple"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["factorized_linears"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(k % 32 == 0 for k in manifest["ranks"].values())
    assert manifest["calibration"]["token_sha256"] and manifest["method"] == "swift"
    text = tmp_path / "eval.txt"
    text.write_text(WIKI_TEST.read_text()[:30000])
    code = main(["ppl", str(out), "--text", str(text), "--seqlen", "128", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["seqlen"] == 128 and r["tokens_scored"] == r["windows"] * 127 and r["ppl"] > 1


def test_unsupported_transformers_major_version(capsys, tmp_path, tiny_model_dir, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    out = tmp_path / "o"
    assert main(["compress", str(tiny_model_dir), str(out), "--ratio", "0.4"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "swiftsvd-export compress: error: transformers 5.17.0 is not supported: this tool is built and tested on "
        "transformers 4.57.6 (pip install 'transformers==4.57.6')"]
    assert not out.exists()


@pytest.mark.parametrize("ridge", ["0", "-1", "nan"])
def test_refit_ridge_out_of_range(capsys, tmp_path, tiny_model_dir, ridge):
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--sequential", "--refit",
                     "--refit-ridge", ridge)
    _assert_clean_failure(code, err, out, "--refit-ridge must be a positive number")


@pytest.mark.parametrize("beta", ["1", "-0.1", "nan"])
def test_shrink_out_of_range(capsys, tmp_path, tiny_model_dir, beta):
    out = tmp_path / "o"
    code, err = _run(capsys, "compress", str(tiny_model_dir), str(out), "--ratio", "0.4", "--shrink", beta)
    _assert_clean_failure(code, err, out, "--shrink must be in [0, 1)")
