"""Benchmark: uniform vs dynamic rank allocation on SmolLM2-135M, and re-targeting time.

    python tools/bench_allocation.py [--ppl-windows 40] [--ratios 0.2 0.4 0.6] [--keep-cache]

Calibration: WikiText-2 train prefix (64 x 512 tokens, seed 0), read from ../shared (never copied).
Perplexity: WikiText-2 test, first ``--ppl-windows`` windows of 512 tokens (a full pass is ~12 min
per model on the shared 2-core machine). Writes bench_out/allocation.json, a table on stdout and
bench_out/ppl_vs_ratio.png + bench_out/ranks_dynamic_<r>.png.

The first compression calibrates (cold statistics cache, entry deleted first unless
--keep-cache); every later one is a re-target from the cache, and its wall time is reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-cache", action="store_true", help="do not delete the cache entry first")
    ap.add_argument("--out", default=str(ROOT / "bench_out"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from swiftsvd_export.compress import CompressConfig, compress_model
    from swiftsvd_export.calibration import build_calibration
    from swiftsvd_export.models import load_model
    from swiftsvd_export.perplexity import perplexity
    from swiftsvd_export.plots import plot_ppl_vs_ratio, plot_ranks
    from swiftsvd_export.stats_cache import entry_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    dense, tok, folder = load_model(args.model)
    load_s = time.perf_counter() - t
    text = TEST.read_text(encoding="utf-8")
    base = dict(model=args.model, output=None, calib=str(TRAIN), nsamples=64, seqlen=512, seed=0,
                batch_size=8, progress=False, alpha=args.alpha)
    calib = build_calibration(tok, TRAIN, 64, 512, 0)
    entry = entry_path(folder, calib.hash, "swift")
    if not args.keep_cache and entry.exists():
        entry.unlink()

    def ppl(model):
        return perplexity(model, tok, text, seqlen=512, max_windows=args.ppl_windows, progress=False)["ppl"]

    rows = []
    t = time.perf_counter()
    d_ppl = ppl(dense)
    print(f"dense: ppl {d_ppl:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    first = None
    retarget = []
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
                first = {"ratio": r, "allocation": alloc, "wall_s": wall, "cache": res.choice.get("stats_cache"),
                         "timings": res.timings}
            else:
                retarget.append({"ratio": r, "allocation": alloc, "wall_s": wall, "cache_hit": hit})
            p = res.params()
            t = time.perf_counter()
            q = ppl(m)
            row = {"ratio": r, "allocation": alloc, "linear_params": p["linear_params_after"],
                   "achieved_ratio": p["achieved_ratio"], "normalized_error": res.normalized_error,
                   "ppl": q, "compress_s": wall, "cache_hit": hit, "ppl_s": time.perf_counter() - t}
            rows.append(row)
            curve[alloc].append(q)
            if alloc == "dynamic":
                plot_ranks(res.shapes, res.ranks, out / f"ranks_dynamic_{r}.png",
                           title=f"SmolLM2-135M dynamic ranks, ratio {r}")
            print(f"ratio {r} {alloc:8s}: params {p['linear_params_after']:,} ppl {q:.3f} "
                  f"compress {wall:.1f} s ({'cache hit' if hit else res.choice.get('stats_cache')})", flush=True)
            del m
    plot_ppl_vs_ratio(curve, out / "ppl_vs_ratio.png",
                      ylabel=f"WikiText-2 test ppl (first {args.ppl_windows} x 512 tokens)")
    print()
    print(f"SmolLM2-135M, WikiText-2 calib 64x512 seed 0, test ppl on the first {args.ppl_windows} windows of 512; "
          f"alpha {args.alpha}; dense ppl {d_ppl:.3f}")
    print(f"{'ratio':>5} | {'uniform params':>14} | {'uniform ppl':>11} | {'dynamic params':>14} | {'param diff':>10} | "
          f"{'dynamic ppl':>11} | win")
    ok = True
    for r in args.ratios:
        u = next(x for x in rows if x["ratio"] == r and x["allocation"] == "uniform")
        d = next(x for x in rows if x["ratio"] == r and x["allocation"] == "dynamic")
        diff = d["linear_params"] / u["linear_params"] - 1
        win = d["ppl"] <= u["ppl"]
        ok &= win and abs(diff) <= 0.005
        print(f"{r:>5} | {u['linear_params']:>14,} | {u['ppl']:>11.3f} | {d['linear_params']:>14,} | "
              f"{100 * diff:>9.3f}% | {d['ppl']:>11.3f} | {'yes' if win else 'NO'}")
    rt = [x["wall_s"] for x in retarget if x["cache_hit"]]
    print(f"first compression (calibration + eigendecompositions + cache write): {first['wall_s']:.1f} s; "
          f"re-targeted compressions from the cache: {', '.join(f'{x:.1f}' for x in rt)} s "
          f"(max {max(rt) if rt else float('nan'):.1f} s)")
    size = entry.stat().st_size if entry.exists() else 0
    print(f"cache entry {entry} ({size / 1e6:.0f} MB)")
    result = {"model": args.model, "dense_ppl": d_ppl, "ppl_windows": args.ppl_windows, "alpha": args.alpha,
              "model_load_s": load_s, "rows": rows, "first_run": first, "retarget": retarget,
              "cache_entry": str(entry), "cache_bytes": size, "targets_met": ok and bool(rt) and max(rt) <= 10,
              "threads": args.threads}
    (out / "allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'allocation.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
