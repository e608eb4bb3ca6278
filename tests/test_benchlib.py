"""The benchmarks' affine decode-time fit (tools/benchlib.fit_fixed_cost), the figure the README uses
to say how much of a token its bytes do not explain."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from benchlib import fit_fixed_cost  # noqa: E402


def test_fit_recovers_bandwidth_and_fixed_cost():
    bw, fixed = 25e9, 4.0  # bytes/s, ms
    b = [146e6, 120e6, 101e6]
    f = fit_fixed_cost(b, [x / bw * 1e3 + fixed for x in b])
    assert f["bandwidth_gb_s"] == pytest.approx(25.0)
    assert f["fixed_ms"] == pytest.approx(4.0)
    assert f["max_abs_residual_ms"] < 1e-9
    assert f["fixed_share_of_first"] == pytest.approx(4.0 / (146e6 / bw * 1e3 + 4.0))


def test_ceiling_is_where_the_target_is_exactly_met():
    b_d, b_c, bw = 146e6, 101e6, 30e9
    ceiling = fit_fixed_cost([b_d, b_c], [b_d / bw * 1e3 + 1, b_c / bw * 1e3 + 1])["ceiling_fixed_ms"]
    at = (b_d / bw * 1e3 + ceiling) / (b_c / bw * 1e3 + ceiling)
    assert at == pytest.approx(0.9 * b_d / b_c)
    # a larger fixed cost misses the target, a smaller one meets it
    for f, meets in ((ceiling * 1.2, False), (ceiling * 0.8, True)):
        assert ((b_d / bw * 1e3 + f) / (b_c / bw * 1e3 + f) >= 0.9 * b_d / b_c) is meets


def test_fit_needs_two_byte_counts():
    with pytest.raises(ValueError, match="two models"):
        fit_fixed_cost([1e6, 1e6], [1.0, 2.0])


def test_fits_of_a_saved_gguf_run(tmp_path):
    """bench_gguf.py's JSON: one fit per (type, threads, wait, flash attn) and context, dense first."""
    import json

    from benchlib import fits_of_results

    rows = []
    for model, nbytes in (("0.4", 100e6), ("dense", 150e6), ("0.2", 120e6)):
        for threads, fixed in ((1, 2.0), (2, 5.0)):
            rows.append({"model": model, "type": "q8_0", "threads": threads, "omp_wait_policy": "-",
                         "flash_attn": "off", "bytes_per_token": nbytes, "kv_bytes_per_position": 1000,
                         **{f"decode_tok_s@{c}": 1e3 / ((nbytes + c * 1000) / 20e9 * 1e3 + fixed)
                            for c in (128, 1024)}})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": rows}))
    fits = fits_of_results(path)
    assert [(f["threads"], f["context"]) for f in fits] == [(1, 128), (1, 1024), (2, 128), (2, 1024)]
    for f in fits:
        assert f["models"] == ["dense", "0.2", "0.4"]
        assert f["bandwidth_gb_s"] == pytest.approx(20.0)
        assert f["fixed_ms"] == pytest.approx(2.0 if f["threads"] == 1 else 5.0)
