"""Shared by the benchmarks in tools/: run one measurement in a fresh Python process (its own peak
RSS, thread settings and environment) and read back the JSON line it prints last; fit decode time
against bytes read.

    python tools/benchlib.py fit tools/results/onnx-traced-2026-11-30-lean.json   # the fit of a saved run
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_json_child(script: str | Path, args: list, env: dict | None = None) -> dict:
    """``python script *args``; its last stdout line as JSON. A failed child stops the benchmark
    with the command and the tail of its stderr."""
    cmd = [sys.executable, str(script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fit_fixed_cost(bytes_read: list[float], ms_per_token: list[float]) -> dict:
    """Least-squares fit of ms per token = bytes / bandwidth + fixed, over models measured side by side.

    The decode targets assume time ∝ bytes read; ``fixed`` is what a token costs beyond its bytes
    (synchronisation, one-row ops, per-row attention), the same for dense and compressed models.
    ``ceiling_fixed_ms`` is the largest fixed cost at which the last model (the most compressed)
    could still reach 0.9 × the byte-predicted speedup over the first (dense) at the fitted bandwidth:
    0.9·b_d/b_c = (b_d/bw + F)/(b_c/bw + F)  ⇒  F = (b_d − 0.9·b_d)/(bw·(0.9·b_d/b_c − 1))."""
    import numpy as np

    b = np.asarray(bytes_read, dtype=float)
    t = np.asarray(ms_per_token, dtype=float)
    if len(b) < 2 or np.ptp(b) == 0:
        raise ValueError("the fit needs at least two models with different byte counts")
    (ms_per_byte, fixed), *_ = np.linalg.lstsq(np.c_[b, np.ones_like(b)], t, rcond=None)
    residual = t - (ms_per_byte * b + fixed)
    need = 0.9 * b[0] / b[-1]
    ceiling = (b[0] - 0.9 * b[0]) * ms_per_byte / (need - 1) if need > 1 else float("inf")
    return {"bandwidth_gb_s": float(1e-6 / ms_per_byte) if ms_per_byte > 0 else float("nan"),
            "fixed_ms": float(fixed), "fixed_share_of_first": float(fixed / t[0]),
            "max_abs_residual_ms": float(np.abs(residual).max()), "ceiling_fixed_ms": float(ceiling)}


CELL = ("type", "threads", "omp_wait_policy", "flash_attn", "turn")  # what a side-by-side cell of rows shares


def fits_of_results(path: str | Path) -> list[dict]:
    """``fit_fixed_cost`` for every cell of a saved bench_gguf.py or bench_onnx.py JSON."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    wkey = "bytes_per_token" if "bytes_per_token" in rows[0] else "weight_bytes"
    contexts = sorted({int(k.split("@")[1]) for k in rows[0] if k.startswith("decode_tok_s@")})
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("stack_a"):  # bench_onnx.py --stack-a both: the same bytes as an unstacked row, another graph
            continue
        key = tuple(r.get(k, "-") for k in CELL)  # bench_onnx.py rows have threads only
        cells.setdefault(key, []).append(r)
    fits = []
    for key, rs in cells.items():
        for ctx in contexts:
            rs = sorted(rs, key=lambda r: -(r[wkey] + ctx * r["kv_bytes_per_position"]))
            f = fit_fixed_cost([r[wkey] + ctx * r["kv_bytes_per_position"] for r in rs],
                               [1e3 / r[f"decode_tok_s@{ctx}"] for r in rs])
            fits.append({**dict(zip(CELL, key)), "context": ctx, "models": [r["model"] for r in rs], **f})
    return fits


def fits_table(fits: list[dict]) -> list[str]:
    """Markdown rows of ``fits``: what a token costs beyond its bytes, against what the target allows."""
    lines = ["| type | threads | wait | flash attn | turn | context | bandwidth GB/s | fixed ms/token | fixed share of "
             "dense | max residual ms | fixed ms the target allows |", "|" + "---|" * 11]
    for f in fits:
        lines.append(f"| {f['type']} | {f['threads']} | {f['omp_wait_policy']} | {f['flash_attn']} | {f['turn']} | {f['context']} | "
                     f"{f['bandwidth_gb_s']:.1f} | {f['fixed_ms']:.2f} | {100 * f['fixed_share_of_first']:.0f} % | "
                     f"{f['max_abs_residual_ms']:.2f} | {f['ceiling_fixed_ms']:.2f} |")
    return lines


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fit ms per token = bytes / bandwidth + fixed over the models of "
                                 "each cell of a saved benchmark JSON (bench_gguf.py or bench_onnx.py).",
                                 epilog="example: python tools/benchlib.py fit tools/results/gguf-flash-attn-2026-12-01.json")
    ap.add_argument("command", choices=["fit"])
    ap.add_argument("results", type=Path)
    a = ap.parse_args()
    print("\n".join(fits_table(fits_of_results(a.results))))
