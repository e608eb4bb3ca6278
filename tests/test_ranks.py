import json

import pytest

from swiftsvd_export.errors import SwiftSVDError
from swiftsvd_export.ranks import (break_even, check_ratio, param_count, read_ranks_file, uniform_rank,
                                   uniform_ranks)


def test_rank_formula_and_rounding():
    assert uniform_rank(576, 576, 0.4) == 172  # floor(0.6*576*576/1152) = floor(172.8)
    assert uniform_rank(1536, 576, 0.2) == 335  # floor(0.8*884736/2112) = floor(335.1)
    assert uniform_rank(192, 576, 0.2) == 115
    assert uniform_rank(576, 576, 0.4, multiple=32) == 160
    assert uniform_rank(192, 576, 0.2, multiple=32) == 128  # 115 is nearer 128 than 96
    assert uniform_rank(1536, 576, 0.4, multiple=32) == 256  # 251
    assert uniform_rank(192, 576, 0.9, multiple=32) == 32  # 14 rounds to 0: the multiple is the floor
    assert uniform_rank(64, 64, 0.05, multiple=16) == 16  # 30 would round up to 32 > break-even 31


def test_break_even_stays_dense():
    assert break_even(4, 4) == 1  # 1*(8) < 16, 2*8 = 16 saves nothing
    assert uniform_rank(64, 64, 0.01) == 31  # floor(0.99*4096/128)=31 < 32
    assert uniform_rank(10, 10, 0.01) == 4  # floor(4.95) = 4 = break-even (4*20=80 < 100)
    # rounding up to the multiple can cross break-even: then the matrix stays dense
    assert uniform_rank(40, 40, 0.5, multiple=32) is None


def test_achieved_ratio_close_to_requested():
    shapes = {"q": (576, 576), "k": (192, 576), "g": (1536, 576), "d": (576, 1536)}
    ranks = uniform_ranks(shapes, 0.4)
    dense, after = param_count(shapes, ranks)
    assert 0.4 <= 1 - after / dense < 0.41


def test_rounded_ratio_stays_near_requested():
    """SmolLM2's shapes: rounding to 32 moves the achieved ratio by a few points, not to 0.467."""
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
              "g": (1536, 576), "u": (1536, 576), "d": (576, 1536)}
    for ratio in (0.2, 0.4, 0.6):
        dense, after = param_count(shapes, uniform_ranks(shapes, ratio, multiple=32))
        assert abs((1 - after / dense) - ratio) < 0.03, ratio


@pytest.mark.parametrize("r", [0.0, 1.0, -0.1, 1.5])
def test_ratio_out_of_range(r):
    with pytest.raises(SwiftSVDError, match="ratio must be in"):
        check_ratio(r)


def test_ranks_file(tmp_path):
    shapes = {"a": (64, 64), "b": (32, 64)}
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"a": 8, "b": 30}))
    assert read_ranks_file(p, shapes) == {"a": 8}  # b: 30 > break-even 21 -> stays dense
    p.write_text(json.dumps({"a": 65}))
    with pytest.raises(SwiftSVDError, match="out of range"):
        read_ranks_file(p, shapes)
    p.write_text(json.dumps({"zz": 3}))
    with pytest.raises(SwiftSVDError, match="not a compressible linear"):
        read_ranks_file(p, shapes)
    with pytest.raises(SwiftSVDError, match="does not exist"):
        read_ranks_file(tmp_path / "missing.json", shapes)
