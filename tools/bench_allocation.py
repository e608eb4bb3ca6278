"""Benchmark: uniform vs dynamic rank allocation on SmolLM2-135M, and re-targeting time.

    python tools/bench_allocation.py [--ppl-windows 40] [--ratios 0.2 0.4 0.6] [--alpha 1.0]

Calibration: WikiText-2 train prefix (64 x 512 tokens, seed 0), read from ../shared (never copied).
Perplexity: WikiText-2 test, first ``--ppl-windows`` windows of 512 tokens (at least 40).

The run uses a fresh, empty cache folder (``$SWIFTSVD_CACHE`` pointed at a new temporary
directory, removed at the end unless ``--keep-cache``), so the first compression is a real
cold run: tokenization, calibration pass, eigendecompositions and cache write. Every later
compression re-targets from that cache; its in-process wall time is reported, and so is the
end-to-end wall time of ``swiftsvd-export compress`` re-targets run as separate processes
(interpreter start, model load, cache check, factors, writing the folder).

Writes ``--out``/allocation.json, ppl_vs_ratio.png and ranks_dynamic_<r>.png, and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"
CLI_RETARGETS = (("uniform", 0.3), ("dynamic", 0.5))


def cli_retarget(model: str, alloc: str, ratio: float, alpha: float, out: Path) -> float:
    """Wall time of a separate ``swiftsvd-export compress`` process hitting the warm cache."""
    cmd = [sys.executable, "-m", "swiftsvd_export.cli", "compress", model, str(out), "--ratio", str(ratio),
           "--calib", str(TRAIN), "--allocation", alloc, "--alpha", str(alpha), "--overwrite", "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    if json.loads(proc.stdout)["choice"].get("stats_cache") != "hit":
        raise RuntimeError(f"{' '.join(cmd)} did not hit the statistics cache")
    return wall


def compare_table(rows: list[dict], ratios: list[float]) -> tuple[list[dict], bool]:
    """Per ratio: uniform vs dynamic at the same parameter count (±0.5 %)."""
    table, ok = [], True
    for r in ratios:
        u = next(x for x in rows if x["ratio"] == r and x["allocation"] == "uniform")
        d = next(x for x in rows if x["ratio"] == r and x["allocation"] == "dynamic")
        diff = d["linear_params"] / u["linear_params"] - 1
        win = d["ppl"] <= u["ppl"] and abs(diff) <= 0.005
        ok &= win
        table.append({"ratio": r, "uniform_params": u["linear_params"], "uniform_ppl": u["ppl"],
                      "dynamic_params": d["linear_params"], "param_diff": diff, "dynamic_ppl": d["ppl"],
                      "dynamic_wins": win})
    return table, ok


def print_table(table: list[dict], header: str) -> None:
    print(header)
    print("| ratio | uniform params | uniform ppl | dynamic params | param diff | dynamic ppl | dynamic <= uniform |")
    print("|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['ratio']} | {t['uniform_params']:,} | {t['uniform_ppl']:.3f} | {t['dynamic_params']:,} | "
              f"{100 * t['param_diff']:+.3f} % | {t['dynamic_ppl']:.3f} | {'yes' if t['dynamic_wins'] else 'NO'} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-cache", action="store_true", help="keep the fresh cache folder at the end")
    ap.add_argument("--out", default=str(ROOT / "bench_out"))
    args = ap.parse_args()
    if args.ppl_windows < 40:
        ap.error("--ppl-windows must be at least 40")
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="swiftsvd-bench-cache-"))
    os.environ["SWIFTSVD_CACHE"] = str(cache)  # read at call time by paths.cache_root()

    from swiftsvd_export.compress import CompressConfig, compress_model
    from swiftsvd_export.models import load_model
    from swiftsvd_export.perplexity import perplexity
    from swiftsvd_export.plots import plot_ppl_vs_ratio, plot_ranks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    dense, tok, folder = load_model(args.model)
    load_s = time.perf_counter() - t
    text = TEST.read_text(encoding="utf-8")
    base = dict(model=args.model, output=None, calib=str(TRAIN), nsamples=64, seqlen=512, seed=0,
                batch_size=8, progress=False, alpha=args.alpha)

    def ppl(model):
        return perplexity(model, tok, text, seqlen=512, max_windows=args.ppl_windows, progress=False)["ppl"]

    rows, retarget, first = [], [], None
    t = time.perf_counter()
    d_ppl = ppl(dense)
    print(f"dense: ppl {d_ppl:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    curve = {"ratios": args.ratios, "dense": d_ppl, "uniform": [], "dynamic": []}
    for r in args.ratios:
        for alloc in ("uniform", "dynamic"):
            m = copy.deepcopy(dense)
            cfg = CompressConfig(**base, ratio=r, allocation=alloc)
            t = time.perf_counter()
            res = compress_model(m, tok, cfg, source=folder)
            wall = time.perf_counter() - t
            hit = res.choice.get("stats_cache") == "hit"
            if first is None:
                if hit:
                    raise RuntimeError("the first compression hit a cache in a fresh folder")
                first = {"ratio": r, "allocation": alloc, "wall_s": wall, "cache": res.choice.get("stats_cache"),
                         "timings": res.timings}
            else:
                retarget.append({"ratio": r, "allocation": alloc, "wall_s": wall, "cache_hit": hit,
                                 "timings": res.timings})
            p = res.params()
            t = time.perf_counter()
            q = ppl(m)
            rows.append({"ratio": r, "allocation": alloc, "linear_params": p["linear_params_after"],
                         "achieved_ratio": p["achieved_ratio"], "normalized_error": res.normalized_error,
                         "ppl": q, "compress_s": wall, "cache_hit": hit, "ppl_s": time.perf_counter() - t})
            curve[alloc].append(q)
            if alloc == "dynamic":
                plot_ranks(res.shapes, res.ranks, out / f"ranks_dynamic_{r}.png",
                           title=f"SmolLM2-135M dynamic ranks, ratio {r}")
            print(f"ratio {r} {alloc:8s}: params {p['linear_params_after']:,} ppl {q:.3f} "
                  f"compress {wall:.1f} s ({'cache hit' if hit else res.choice.get('stats_cache')})", flush=True)
            del m
    plot_ppl_vs_ratio(curve, out / "ppl_vs_ratio.png",
                      ylabel=f"WikiText-2 test ppl (first {args.ppl_windows} x 512 tokens)")
    cli = [{"allocation": a, "ratio": r, "wall_s": cli_retarget(args.model, a, r, args.alpha, cache / f"out-{a}-{r}")}
           for a, r in CLI_RETARGETS]
    entry = compress_entry(cache)
    size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) if entry.exists() else 0
    table, ok = compare_table(rows, args.ratios)
    print()
    print_table(table, f"SmolLM2-135M, WikiText-2 calibration 64 x 512 (seed 0), test ppl on the first "
                       f"{args.ppl_windows} windows of 512; dynamic alpha {args.alpha}; dense ppl {d_ppl:.3f}")
    rt = [x["wall_s"] for x in retarget if x["cache_hit"]]
    print(f"\nfirst (cold) compression: {first['wall_s']:.1f} s in process "
          f"(calibration {first['timings'].get('calibration_s', 0):.1f} s, "
          f"factorization {first['timings'].get('factorize_s', 0):.1f} s)")
    print(f"re-targeted compressions from the cache, in process: {', '.join(f'{x:.2f}' for x in rt)} s "
          f"(max {max(rt):.2f} s)")
    print("re-targeted `swiftsvd-export compress` processes, end to end: "
          + ", ".join(f"{c['allocation']} {c['ratio']}: {c['wall_s']:.1f} s" for c in cli))
    print(f"cache entry {entry} ({size / 1e6:.0f} MB)")
    result = {"model": args.model, "dense_ppl": d_ppl, "ppl_windows": args.ppl_windows, "alpha": args.alpha,
              "model_load_s": load_s, "rows": rows, "table": table, "first_run": first, "retarget": retarget,
              "retarget_cli": cli, "cache_entry": str(entry), "cache_bytes": size, "threads": args.threads,
              "targets_met": ok and bool(rt) and max(rt + [c["wall_s"] for c in cli]) <= 10}
    (out / "allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'allocation.json'}")
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


def compress_entry(cache: Path) -> Path:
    """The single statistics entry of the fresh cache folder."""
    entries = [p.parent for p in (cache / "stats").rglob("meta.json")]
    return entries[0] if entries else cache / "stats"


if __name__ == "__main__":
    raise SystemExit(main())
