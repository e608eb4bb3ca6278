"""Benchmark: rank allocation (uniform, dynamic-cos, dynamic-loss), the refit, and re-targeting time.

    python tools/bench_allocation.py compare --ratios 0.2 0.4 0.6 --heldout-windows 16 --ppl-windows 0
    python tools/bench_allocation.py compare --ratios 0.2 --heldout-windows 0 --ppl-windows 64
    python tools/bench_allocation.py refit --ratios 0.2 --heldout-windows 16 --ppl-windows 64
    python tools/bench_allocation.py retarget
    python tools/bench_allocation.py shrink --ratios 0.2 0.4 --shrinks 0 0.05 0.1 0.2 0.3 --ppl-windows 16
    python tools/bench_allocation.py shrink --model gemma3-270m --nsamples 32 --calibs wikitext2 --shrinks 0 0.05
    python tools/bench_allocation.py table

Model SmolLM2-135M (``--model``). Calibration: WikiText-2 train prefix, ``--nsamples`` (64) x 512
tokens (seed 0), read from ../shared (never copied). Two evaluations:
- held-out: ``--heldout-windows`` windows of 512 tokens of the same WikiText-2 *train* stream that
  are not among the calibration windows (the next ones in the seeded permutation); choices
  (alpha, importance, refit) are made on this slice, never on the test set;
- test: the first ``--ppl-windows`` windows of 512 tokens of WikiText-2 test.

Parts (each one job of a few minutes, so they can run one at a time under the shared lock):
- ``compare``: per ratio, uniform vs dynamic with ``--importance cos`` vs ``--importance loss``,
  all at the same parameter budget ((1 − ratio) x the dense linears; uniform's floor() per
  matrix leaves it up to 0.5 % below);
- ``refit``: per ratio, ``--sequential`` vs ``--sequential --refit`` at the same ranks
  (``--refit-allocation``, uniform by default, as the default release), at the default
  ``--refit-ridge`` and at each of ``--refit-ridges`` (how the default was chosen, on held-out ppl);
- ``retarget``: a cold compression in a fresh, empty cache folder, then re-targets from it
  (in process, and ``swiftsvd-export compress`` processes end to end);
- ``shrink``: per calibration text (``--calibs``: WikiText-2 train, and the shipped self-generated
  set that ``compress`` uses without ``--calib``), ratio and ``--shrinks`` value, the default
  compression (dynamic allocation) with its covariances shrunk toward their diagonals (how the
  default release's ``shrink`` was chosen, on held-out ppl, and why ``compress`` keeps 0).

``--cache DIR`` reuses a statistics cache across parts (``compare``/``refit``; ``retarget``
always starts from a fresh one). Every part merges its rows into ``--json`` (rows of the same
part, ratio and configuration are replaced), then prints the tables of everything in it.
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
COMPARE = (("uniform", {"allocation": "uniform"}), ("dynamic-cos", {"allocation": "dynamic", "importance": "cos"}),
           ("dynamic-loss", {"allocation": "dynamic", "importance": "loss"}))


class Bench:
    def __init__(self, args):
        from swiftsvd_export.calibration import build_calibration
        from swiftsvd_export.models import load_model

        self.args = args
        t = time.perf_counter()
        self.dense, self.tok, self.folder = load_model(args.model)
        self.load_s = time.perf_counter() - t
        self.base = dict(model=args.model, output=None, calib=str(TRAIN), nsamples=args.nsamples, seqlen=512, seed=0,
                         batch_size=8, progress=False, alpha=args.alpha, importance_windows=args.importance_windows)
        self.holdout = None
        if args.heldout_windows:
            self.holdout = build_calibration(self.tok, TRAIN, args.nsamples, 512, 0,
                                             holdout=args.heldout_windows).holdout
        self.text = TEST.read_text(encoding="utf-8")

    def evaluate(self, model) -> dict:
        from swiftsvd_export.compress import heldout_ppl
        from swiftsvd_export.perplexity import perplexity

        out = {}
        t = time.perf_counter()
        if self.holdout is not None:
            out["heldout_ppl"] = heldout_ppl(model, self.holdout, 4)
            out["heldout_windows"] = int(self.holdout.shape[0])
        if self.args.ppl_windows:
            out["test_ppl"] = perplexity(model, self.tok, self.text, seqlen=512, max_windows=self.args.ppl_windows,
                                         progress=False)["ppl"]
            out["test_windows"] = self.args.ppl_windows
        out["eval_s"] = time.perf_counter() - t
        return out

    def run(self, part: str, ratio: float, config: str, **kw) -> dict:
        from swiftsvd_export.compress import CompressConfig, compress_model

        m = copy.deepcopy(self.dense)
        cfg = CompressConfig(**{**self.base, **kw}, ratio=ratio)
        t = time.perf_counter()
        res = compress_model(m, self.tok, cfg, source=self.folder)
        wall = time.perf_counter() - t
        p = res.params()
        row = {"part": part, "ratio": ratio, "config": config, "linear_params": p["linear_params_after"],
               "achieved_ratio": p["achieved_ratio"], "compress_s": wall, "stats_cache": res.choice.get("stats_cache"),
               "timings": res.timings, **self.evaluate(m)}
        if "loss_importance" in res.choice:
            row["loss_importance"] = res.choice["loss_importance"]
        print(f"{part} ratio {ratio} {config:14s}: params {row['linear_params']:,} "
              + " ".join(f"{k} {row[k]:.3f}" for k in ("heldout_ppl", "test_ppl") if k in row)
              + f" (compress {wall:.1f} s, stats {row['stats_cache']})", flush=True)
        del m
        return row

    def dense_row(self) -> dict:
        """The dense model's figures, unless ``--json`` already has them for these windows."""
        path = Path(self.args.json)
        old = [r for r in json.loads(path.read_text())["rows"] if r["part"] == "dense"] if path.is_file() else []
        want = {"heldout_windows": self.args.heldout_windows or None, "test_windows": self.args.ppl_windows or None}
        if old and all(v is None or old[0].get(k) == v for k, v in want.items()):
            return old[0]
        row = {"part": "dense", "ratio": 0.0, "config": "dense", **self.evaluate(self.dense)}
        print("dense: " + " ".join(f"{k} {row[k]:.3f}" for k in ("heldout_ppl", "test_ppl") if k in row), flush=True)
        return row


def part_compare(bench: Bench, args) -> list[dict]:
    rows = [bench.dense_row()]
    for r in args.ratios:
        for name, kw in COMPARE:
            if name in args.configs:
                rows.append(bench.run("compare", r, name, **kw))
    return rows


def refit_config(ridge: float) -> str:
    return f"sequential+refit ridge {ridge:g}"


def part_refit(bench: Bench, args) -> list[dict]:
    """Per ratio: sequential, then sequential+refit at the default ridge and at each other --refit-ridges."""
    from swiftsvd_export.compress import REFIT_RIDGE

    rows = [bench.dense_row()]
    for r in args.ratios:
        rows.append(bench.run("refit", r, "sequential", sequential=True, allocation=args.refit_allocation))
        for ridge in sorted(set(args.refit_ridges) | {REFIT_RIDGE}):
            row = bench.run("refit", r, refit_config(ridge), sequential=True, refit=True, refit_ridge=ridge,
                            allocation=args.refit_allocation)
            rows.append(dict(row, refit_ridge=ridge))
    return rows


def part_shrink(bench: Bench, args) -> list[dict]:
    """Per calibration text, shrinkage and ratio: the default compression (one calibration pass per
    text and shrinkage; the other ratios re-target from its statistics cache entry)."""
    from swiftsvd_export.calibration import DEFAULT_CALIBRATION

    rows = [bench.dense_row()]
    for source, calib in (("wikitext2", TRAIN), ("selfgen", DEFAULT_CALIBRATION)):
        if source not in args.calibs:
            continue
        for beta in args.shrinks:
            for r in args.ratios:
                rows.append(dict(bench.run("shrink", r, shrink_config(source, beta), calib=str(calib), shrink=beta),
                                 source=source, shrink=beta))
    return rows


def shrink_config(source: str, beta: float) -> str:
    return f"{source} shrink {beta:g}"


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


def part_retarget(bench: Bench, args) -> list[dict]:
    """Cold run in a fresh cache folder, then re-targets (no perplexity: timing only)."""
    from swiftsvd_export.compress import CompressConfig, compress_model

    rows = []
    for i, (alloc, r) in enumerate((("uniform", 0.2), ("dynamic", 0.2), ("uniform", 0.4), ("dynamic", 0.6))):
        m = copy.deepcopy(bench.dense)
        t = time.perf_counter()
        res = compress_model(m, bench.tok, CompressConfig(**bench.base, ratio=r, allocation=alloc),
                             source=bench.folder)
        wall = time.perf_counter() - t
        hit = res.choice.get("stats_cache") == "hit"
        if i == 0 and hit:
            raise RuntimeError("the first compression hit a cache in a fresh folder")
        rows.append({"part": "retarget", "ratio": r, "config": alloc if i else f"{alloc} (cold)", "wall_s": wall,
                     "stats_cache": res.choice.get("stats_cache"), "timings": res.timings})
        print(f"retarget {alloc} {r}: {wall:.2f} s ({res.choice.get('stats_cache')})", flush=True)
    cache = Path(os.environ["SWIFTSVD_CACHE"])
    for a, r in CLI_RETARGETS:
        rows.append({"part": "retarget", "ratio": r, "config": f"cli {a}",
                     "wall_s": cli_retarget(args.model, a, r, args.alpha, cache / f"out-{a}-{r}")})
        print(f"retarget cli {a} {r}: {rows[-1]['wall_s']:.1f} s", flush=True)
    entries = [p.parent for p in (cache / "stats").rglob("meta.json")]
    size = sum(p.stat().st_size for p in entries[0].rglob("*") if p.is_file()) if entries else 0
    rows.append({"part": "retarget", "ratio": 0.0, "config": "cache entry", "bytes": size})
    return rows


def merge(path: Path, rows: list[dict], meta: dict) -> dict:
    """Rows of the same (part, ratio, config) are merged field by field, the new values winning,
    so a held-out-only run and a test-only run of the same configurations make one row each."""
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    old = {(r["part"], r["ratio"], r["config"]): r for r in data["rows"]}
    for r in rows:
        old[(r["part"], r["ratio"], r["config"])] = {**old.get((r["part"], r["ratio"], r["config"]), {}), **r}
    data["rows"] = list(old.values())
    data.update(meta)
    return data


def shrink_table(rows: list[dict], metric: str, label: str, dense: dict) -> list[str]:
    """One line per calibration text and ratio, one column per shrinkage."""
    sel = [r for r in rows if r["part"] == "shrink" and metric in r]
    if not sel:
        return []
    betas = sorted({r["shrink"] for r in sel})
    lines = [f"\nshrink: {label} ppl, {sel[0][metric.replace('ppl', 'windows')]} x 512 tokens"
             + (f" (dense {dense[metric]:.3f})" if metric in dense else ""),
             "| calibration | ratio | " + " | ".join(f"shrink {b:g}" for b in betas) + " |",
             "|---|---" + "|---" * len(betas) + "|"]
    for source in sorted({r["source"] for r in sel}, key=lambda s: s != "wikitext2"):
        for ratio in sorted({r["ratio"] for r in sel}):
            cells = [next((f"{r[metric]:.3f}" for r in sel if (r["source"], r["ratio"], r["shrink"]) == (source, ratio, b)),
                          "-") for b in betas]
            lines.append(f"| {source} | {ratio} | " + " | ".join(cells) + " |")
    return lines


def tables(data: dict) -> str:
    rows = data["rows"]
    dense = next((r for r in rows if r["part"] == "dense"), {})
    lines = []
    for metric, label in (("heldout_ppl", "held-out (WikiText-2 train windows not in the calibration set)"),
                          ("test_ppl", "WikiText-2 test")):
        refit = ["sequential"] + sorted({r["config"] for r in rows if "refit_ridge" in r},
                                        key=lambda c: float(c.rsplit(" ", 1)[1]))
        lines += shrink_table(rows, metric, label, dense)
        for part, configs in (("compare", [c for c, _ in COMPARE]), ("refit", refit)):
            sel = [r for r in rows if r["part"] == part and metric in r]
            if not sel:
                continue
            windows = sel[0][metric.replace("ppl", "windows")]
            lines.append(f"\n{part}: {label} ppl, {windows} x 512 tokens"
                         + (f" (dense {dense[metric]:.3f})" if metric in dense else ""))
            lines.append("| ratio | " + " | ".join(f"{c} params | {c} ppl" for c in configs) + " |")
            lines.append("|---" * (1 + 2 * len(configs)) + "|")
            for ratio in sorted({r["ratio"] for r in sel}):
                cells = []
                for c in configs:
                    r = next((x for x in sel if x["ratio"] == ratio and x["config"] == c), None)
                    cells += [f"{r['linear_params']:,}", f"{r[metric]:.3f}"] if r else ["-", "-"]
                lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["part"] == "retarget":
            lines.append(f"retarget {r['config']} {r['ratio']}: "
                         + (f"{r['bytes'] / 1e6:.0f} MB" if "bytes" in r else f"{r['wall_s']:.2f} s"))
        if "loss_importance" in r and r.get("timings", {}).get("loss_importance_s"):
            lines.append(f"loss importance at ratio {r['ratio']}: {r['timings']['loss_importance_s']:.1f} s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["compare", "refit", "retarget", "shrink", "table"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--configs", nargs="+", default=[c for c, _ in COMPARE], choices=[c for c, _ in COMPARE])
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--ppl-windows", type=int, default=64, help="WikiText-2 test windows (0: skip)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--importance-windows", type=int, default=8)
    ap.add_argument("--refit-allocation", default="uniform", choices=["uniform", "dynamic"])
    ap.add_argument("--refit-ridges", type=float, nargs="*", default=[],
                    help="refit: ridges to try besides the default --refit-ridge (one table column each)")
    ap.add_argument("--shrinks", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3],
                    help="shrink: the covariance shrinkages to compare (one calibration pass each per text)")
    ap.add_argument("--calibs", nargs="+", default=["wikitext2", "selfgen"], choices=["wikitext2", "selfgen"],
                    help="shrink: the calibration texts (selfgen: the shipped set, sampled from SmolLM2)")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows of 512 tokens (default 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", help="statistics cache folder to reuse (default: a fresh temporary one)")
    ap.add_argument("--json", default=str(ROOT / "bench_out" / "allocation.json"))
    args = ap.parse_args()
    path = Path(args.json)
    if args.part == "table":
        print(tables(json.loads(path.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    from swiftsvd_export.paths import cache_root

    fresh = args.part == "retarget" or not args.cache
    models = Path(args.cache or cache_root(), "models")
    cache = Path(tempfile.mkdtemp(prefix="swiftsvd-bench-cache-")) if fresh else Path(args.cache)
    if fresh and models.is_dir():  # the model conversion is not what is timed: reuse it
        (cache / "models").symlink_to(models.resolve())
    os.environ["SWIFTSVD_CACHE"] = str(cache)  # read at call time by paths.cache_root()
    try:
        bench = Bench(args)
        rows = {"compare": part_compare, "refit": part_refit, "retarget": part_retarget,
                "shrink": part_shrink}[args.part](bench, args)
    finally:
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
    calibration = (f"{args.nsamples} x 512, seed 0, of " + (" and ".join(args.calibs) if args.part == "shrink"
                                                           else "the WikiText-2 train prefix"))
    meta = {"model": args.model, "calibration": calibration, "alpha": args.alpha,
            "importance_windows": args.importance_windows, "threads": args.threads,
            "model_load_s": bench.load_s}
    data = merge(path, rows, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(tables(data))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
