#!/usr/bin/env python3
"""``compress --device cuda`` against ``--device cpu`` on SmolLM2-135M (not a test; needs a GPU).

Every run is the real command, ``swiftsvd-export compress MODEL OUT --ratio R --dtype fp32 --device D
--precision P`` (dynamic allocation, the default), in its own process with its own statistics
cache, so nothing computed by one run is reused by another. The runs, by default:

- ``cpu-fp32``  the CPU path (all the machine's cores)
- ``cuda-fp32`` the GPU path at the default working precision
- ``cuda-fp64`` the GPU path with float64 decompositions

Then the CUDA runs are compared with ``cpu-fp32``: same calibration token hash, same ranks,
block importances, eigenvalues of every linear (read from each run's statistics cache, relative
to the linear's largest), B·A of every factorized linear (relative to its largest entry), the
normalized reconstruction error; and the WikiText-2 test perplexity of every output and of the
dense model (scored on the GPU, same windows). Speed: the calibration pass (tokens/s), the
decompositions, the whole command, and the peak GPU memory of each run.

``--nccl`` also runs the distributed path on NCCL: 2 ranks under torchrun with ``--device cuda``
(one GPU each) where 2 GPUs are visible; with one GPU both ranks are given ``cuda:0``, which
NCCL may refuse (one GPU per rank): the outcome is recorded as it is.

    python tools/bench_cuda.py --out bench_out/cuda.json
    python tools/bench_cuda.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --nccl --ppl-windows 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("SWIFTSVD_SHARED_DATA") or ROOT.parent / "shared" / "data") / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"
RUNS = {"cpu-fp32": ("cpu", "fp32"), "cuda-fp32": ("cuda", "fp32"), "cuda-fp64": ("cuda", "fp64"),
        "cpu-fp64": ("cpu", "fp64")}


def child(result: str, argv: list[str]) -> None:
    """One ``swiftsvd-export`` command in this process; writes its exit code, peak RSS and GPU memory."""
    import torch

    from swiftsvd_export.cli import main
    from swiftsvd_export.memory import peak_rss_mib

    t = time.perf_counter()
    rc = main(argv)
    info = {"rc": rc, "wall_s": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_initialized():  # a CPU run never touches the GPU
        info["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(result).write_text(json.dumps(info))


def child_env(**extra: str) -> dict:
    """This environment for a child run, with the repository first on its import path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_compress(name: str, folder: Path, work: Path, args) -> dict:
    device, precision = RUNS[name]
    out, result = work / name, work / f"{name}.result.json"
    argv = ["compress", str(folder), str(out), "--ratio", str(args.ratio), "--dtype", "fp32", "--device", device,
            "--precision", precision, "--calib", str(TRAIN), "--nsamples", str(args.nsamples),
            "--seqlen", str(args.seqlen), "--json"]
    env = child_env(SWIFTSVD_CACHE=str(work / f"cache-{name}"))
    print(f"== {name}: swiftsvd-export {' '.join(argv)}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--child", str(result), *argv], env=env,
                          stdout=subprocess.PIPE, text=True)
    info = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode}
    if info["rc"] != 0:
        raise SystemExit(f"bench_cuda: run {name} failed (exit {info['rc']})")
    summary = json.loads(proc.stdout)
    timings = summary["timings"]
    tokens = args.nsamples * args.seqlen
    return {"device": device, "precision": precision, "output": str(out), "cache": env["SWIFTSVD_CACHE"], **info,
            "timings": timings, "calibration_tokens_per_s": tokens / timings["calibration_s"],
            "normalized_reconstruction_error": summary["normalized_reconstruction_error"],
            "linear_params_after": summary["linear_params_after"],
            "versions": json.loads((out / "manifest.json").read_text())["versions"]}


def cached_values(cache: str) -> dict:
    """Every linear's eigenvalues from a run's statistics cache entry."""
    from safetensors import safe_open

    values = {}
    for block in sorted(Path(cache, "stats").glob("*/*/block-*.safetensors")):
        with safe_open(str(block), framework="pt") as f:
            for key in f.keys():
                if key.endswith("::values"):
                    values[key[:-len("::values")]] = f.get_tensor(key)
    return values


def compare(ref: dict, other: dict, models: dict) -> dict:
    """``other`` against ``ref``: calibration hash, ranks, importances, eigenvalues, B·A."""
    from swiftsvd_export.lowrank import LowRankLinear

    ma = json.loads(Path(ref["output"], "manifest.json").read_text())
    mb = json.loads(Path(other["output"], "manifest.json").read_text())
    va, vb = cached_values(ref["cache"]), cached_values(other["cache"])
    assert va and va.keys() == vb.keys(), "statistics caches hold different linears"
    eig = max(((vb[n] - va[n]).abs().max() / va[n].abs().max()).item() for n in va)
    a, b = models[ref["name"]], models[other["name"]]
    mods_a = {n: m for n, m in a.named_modules() if isinstance(m, LowRankLinear)}
    mods_b = dict(b.named_modules())
    worst, worst_name = 0.0, None
    for n, m in mods_a.items():
        pa = m.B.weight @ m.A.weight
        pb = mods_b[n].B.weight @ mods_b[n].A.weight
        gap = ((pb - pa).abs().max() / pa.abs().max()).item()
        if gap > worst:
            worst, worst_name = gap, n
    return {
        "same_calibration_hash": ma["calibration"]["token_sha256"] == mb["calibration"]["token_sha256"],
        "ranks_differing": sum(ma["ranks"].get(n) != k for n, k in mb["ranks"].items())
        + len(set(ma["ranks"]) ^ set(mb["ranks"])),
        "linears": len(ma["ranks"]),
        "importance_max_abs_diff": max(abs(x - y) for x, y in zip(ma["block_importance"], mb["block_importance"])),
        "eigenvalues_max_rel_diff": eig,
        "product_max_rel_diff": worst, "product_worst_linear": worst_name,
        "reconstruction_error_rel_diff": abs(other["normalized_reconstruction_error"]
                                             - ref["normalized_reconstruction_error"])
        / ref["normalized_reconstruction_error"],
    }


def run_nccl(folder: Path, work: Path, args) -> dict:
    """2 ranks on NCCL (torchrun); the caller compares the output with the 1-process cuda-fp32 run."""
    import torch

    gpus = torch.cuda.device_count()
    device = "cuda" if gpus >= 2 else "cuda:0"
    out = work / "nccl-2ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "swiftsvd_export.cli", "compress", str(folder), str(out), "--ratio", str(args.ratio), "--dtype", "fp32",
           "--device", device, "--calib", str(TRAIN), "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--dist-timeout", "120", "--json"]
    env = child_env(SWIFTSVD_CACHE=str(work / "cache-nccl"), OMP_NUM_THREADS="4")
    print(f"== nccl: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    info = {"name": "nccl-2ranks", "output": str(out), "cache": env["SWIFTSVD_CACHE"], "gpus": gpus,
            "device": device, "rc": rc, "wall_s": time.perf_counter() - t,
            "errors": [ln for ln in err.splitlines() if "error:" in ln][:4],
            "stderr_tail": [ln for ln in err.splitlines() if ln.strip()][-12:]}
    print("\n".join(info["errors"] + info["stderr_tail"]), file=sys.stderr)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model source (alias, .gguf or folder)")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=32, help="WikiText-2 test windows of --seqlen tokens")
    ap.add_argument("--runs", default="cpu-fp32,cuda-fp32,cuda-fp64", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--nccl", action="store_true", help="also run 2 ranks on NCCL (see above)")
    ap.add_argument("--work", help="keep the outputs here (default: a temporary folder)")
    ap.add_argument("--out", default="bench_out/cuda.json")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result, *argv = args.child
        return child(result, argv)

    import platform

    import torch
    import transformers

    from swiftsvd_export.lowrank import load
    from swiftsvd_export.models import load_model, resolve
    from swiftsvd_export.perplexity import load_eval_text, perplexity

    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA GPU here (torch.cuda.is_available() is False)")
    names = args.runs.split(",")
    if "cpu-fp32" not in names or any(n not in RUNS for n in names):
        raise SystemExit(f"bench_cuda: --runs must include cpu-fp32 (the reference) and name only {', '.join(RUNS)}")
    folder = resolve(args.model)  # a GGUF is converted once, here
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    print(f"environment: {env}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = {}
        for name in names:
            runs[name] = dict(run_compress(name, folder, work, args), name=name)
        models = {name: load(r["output"]) for name, r in runs.items()}
        comparisons = {name: compare(runs["cpu-fp32"], runs[name], models) for name in names if name != "cpu-fp32"}
        text = load_eval_text(TEST)
        dense, tokenizer, _ = load_model(str(folder))
        ppl = {}
        for name, m in [("dense", dense), *models.items()]:
            ppl[name] = perplexity(m.cuda(), tokenizer, text, args.seqlen, args.ppl_windows, progress=False)["ppl"]
            m.cpu()
        nccl = run_nccl(folder, work, args) if args.nccl else None
        if nccl is not None and nccl["rc"] == 0 and "cuda-fp32" in runs:
            summary = json.loads(Path(nccl["output"], "manifest.json").read_text())
            nccl["normalized_reconstruction_error"] = summary["normalized_reconstruction_error"]
            models["nccl-2ranks"] = load(nccl["output"])
            nccl["vs_cuda_fp32"] = compare(runs["cuda-fp32"], nccl, models)

    ref = runs["cpu-fp32"]
    lines = [f"SmolLM2-135M, ratio {args.ratio}, {args.nsamples} x {args.seqlen} calibration tokens; "
             f"{env['gpu']} and {env['cpu_count']} CPU cores; torch {env['torch']}", "",
             "| run | calibration tokens/s | decompositions s | command s | GPU peak MiB | "
             f"WikiText-2 ppl ({args.ppl_windows} x {args.seqlen}) |", "|---|---:|---:|---:|---:|---:|"]
    lines.append(f"| dense | | | | | {ppl['dense']:.2f} |")
    for name, r in runs.items():
        gpu_mib = f"{r['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in r else "-"
        lines.append(f"| {name} | {r['calibration_tokens_per_s']:.0f} | {r['timings']['factorize_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {gpu_mib} | {ppl[name]:.3f} |")
    lines += ["", "| vs cpu-fp32 | same calib hash | ranks differing | importance max diff | eigenvalues max rel | "
              "B·A max rel (worst linear) | recon. error rel diff |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, c in comparisons.items():
        lines.append(f"| {name} | {c['same_calibration_hash']} | {c['ranks_differing']} / {c['linears']} | "
                     f"{c['importance_max_abs_diff']:.2e} | {c['eigenvalues_max_rel_diff']:.2e} | "
                     f"{c['product_max_rel_diff']:.2e} ({c['product_worst_linear']}) | "
                     f"{c['reconstruction_error_rel_diff']:.2e} |")
    if nccl is not None:
        lines += ["", f"NCCL, 2 ranks, --device {nccl['device']} on {nccl['gpus']} GPU(s): exit {nccl['rc']} after "
                  f"{nccl['wall_s']:.0f} s" + "".join(f"\n    {ln}" for ln in nccl["errors"])]
        if "vs_cuda_fp32" in nccl:
            lines.append(f"vs 1 process (cuda-fp32): {nccl['vs_cuda_fp32']}")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "compress --device cuda vs cpu", "model": args.model, "ratio": args.ratio,
                               "nsamples": args.nsamples, "seqlen": args.seqlen, "ppl_windows": args.ppl_windows,
                               "environment": env, "runs": runs, "comparisons_vs_cpu_fp32": comparisons,
                               "perplexity": ppl, "nccl": nccl, "reference_run": ref["name"], "table": lines},
                              indent=1, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
