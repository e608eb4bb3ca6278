"""``calib-gen``: seeded self-generated calibration text, optionally with a greedy prefix (LLM-QAT)."""
import json

import torch

from swiftsvd_export.cli import main
from swiftsvd_export.models import load_model


def _gen(tiny_model_dir, out, *extra):
    return main(["calib-gen", str(tiny_model_dir), str(out), "--sequences", "4", "--length", "24",
                 "--batch-size", "2", *extra])


def _texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_calib_gen_is_seeded_and_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert _gen(tiny_model_dir, a) == 0 and _gen(tiny_model_dir, b) == 0
    assert _gen(tiny_model_dir, c, "--seed", "1") == 0
    assert len(_texts(a)) == 4 and all(_texts(a))
    assert a.read_bytes() == b.read_bytes()
    assert _texts(a) != _texts(c)
    capsys.readouterr()
    assert _gen(tiny_model_dir, a) != 0
    assert "exists" in capsys.readouterr().err


def test_greedy_prefix_continues_each_start_token_greedily(tiny_model_dir, tmp_path):
    out = tmp_path / "g.jsonl"
    assert _gen(tiny_model_dir, out, "--greedy-prefix", "3") == 0
    model, tok, _ = load_model(str(tiny_model_dir))
    plain = tmp_path / "p.jsonl"
    assert _gen(tiny_model_dir, plain) == 0
    for text, sampled in zip(_texts(out), _texts(plain)):
        # the same seeded start token; its 3 greedy successors open the greedy-prefix text
        start = tok(text, add_special_tokens=False)["input_ids"][:1]
        assert start == tok(sampled, add_special_tokens=False)["input_ids"][:1]
        ids = torch.tensor([start])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                                min_new_tokens=3, pad_token_id=tok.pad_token_id)[0]
        assert text.startswith(tok.decode(greedy, skip_special_tokens=True))


def test_greedy_prefix_out_of_range_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert _gen(tiny_model_dir, out, "--greedy-prefix", "23") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "--greedy-prefix 23" in err[-1] and not out.exists()
