#!/usr/bin/env python3
"""Benchmark SmolLM2-135M in onnxruntime (CPU): dense against low-rank ratios 0.2 and 0.4.

For each model and thread count (in a fresh child process, so peak RSS is the model's own):
prefill tokens/s at 128 tokens, decode tokens/s at context 128 and 1024, peak RSS, file size.
Then, per thread count, one more child loads all models and lets them take turns, ``--reps``
rounds of ``--decode-steps`` tokens (speed from the median single-token step); the decode speeds
and speedups come from that child, so a change of machine load hits all models alike
(``--separate``: from the per-model children instead, as before 2026-11-30).
Target: decode speedup of compressed over dense >= 0.9 x (dense bytes / compressed bytes read
per decoded token), from the same run. Bytes read per token at context c: every weight
initializer (the tied embedding is read in full as the output head) plus the fp32 cache rows
of the c cached positions (the export summary's bytes per token: the same for dense and
compressed models with a dense cache, fewer with a latent one).

Compressed models: ``--compressed 0.4=out/smol-0.4`` uses a folder from
``swiftsvd-export compress smollm2-135m out/smol-0.4 --ratio 0.4``; without it the model is
factorized here by plain truncated SVD with k = floor((1-r)*m*n/(m+n)) per linear (left dense
where that would not save), which has the same shapes and so the same speed.

``--graph traced`` (the default) exports every model (dense included) as the graph traced from
the project's torch reference with a dense KV cache (``export_onnx(..., graph="traced")``, the
export's default for Llama since 2026-11-30) instead of optimum's: the same attention code for
all models, which multiplies grouped queries against the cached K/V where optimum's graph
expands K and V per query head every step (a cost compression does not shrink).
``--kv-cache latent-v`` gives the compressed models the V-latent cache that ``export`` writes by
default for them (the dense model keeps its dense cache; its bytes per position count in the target).
``--stack-a on|both`` exports the compressed models with ``export --stack-a`` (one MatMul for the A
factors of q/k/v and one for gate/up); ``both`` measures each ratio with and without it in the same
children, side by side. ``--attention gqa`` exports every model (dense included) with ``export
--attention gqa``: each layer's attention is one GroupQueryAttention kernel and the project's
runtime appends to a preallocated cache in place instead of copying it every step.

    python tools/bench_onnx.py --out bench_onnx.json              # ~10 min on 2 busy cores
    python tools/bench_onnx.py --threads 1 --decode-steps 8        # shorter
    python tools/bench_onnx.py --graph optimum --out bench_onnx_optimum.json
    python tools/bench_onnx.py --stack-a both --reps 4 --decode-steps 32
    python tools/bench_onnx.py --attention gqa --stack-a both --reps 4 --decode-steps 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import fits_of_results, fits_table, run_json_child  # noqa: E402
from swiftsvd_export.memory import peak_rss_mib  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def svd_compress(model, ratio: float):
    """Truncated-SVD factorization of every decoder linear at ``ratio`` (fraction of parameters removed)."""
    import torch

    from swiftsvd_export.lowrank import LowRankLinear, replace_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK with 2 threads on a busy 2-core machine is ~10x slower
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in LINEARS:
            continue
        m, n = mod.weight.shape
        k = math.floor((1 - ratio) * m * n / (m + n))
        if k <= 0 or k * (m + n) >= m * n:
            continue
        U, S, Vh = torch.linalg.svd(mod.weight.data.float(), full_matrices=False)
        replace_module(model, name, LowRankLinear.from_factors(Vh[:k].contiguous(), (U[:, :k] * S[:k]),
                                                               bias=mod.bias))
    torch.set_num_threads(threads)
    return model


def child(folder: str, threads: int, prefill: int, contexts: list[int], steps: int, reps: int) -> dict:
    """Runs in a fresh process: times one exported folder."""
    import numpy as np

    from swiftsvd_export.backends.onnx.runtime import OrtDecoder

    t0 = time.perf_counter()
    dec = OrtDecoder(folder, threads=threads)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    out = {"load_s": load_s}
    ids = rng.integers(0, vocab, size=(1, prefill))
    dec.step(ids[:, :8], None, 0)  # warm-up
    best = min(_timed(lambda: dec.step(ids, None, 0)) for _ in range(reps))
    out["prefill_tok_s"] = prefill / best
    for ctx in contexts:
        ids = rng.integers(0, vocab, size=(1, ctx))
        _, cache = dec.step(ids, None, 0)
        tok = np.asarray([[1]])
        _, c2 = dec.step(tok, cache, ctx)  # warm-up at this context
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            c = cache
            for i in range(steps):  # each step attends to ctx + i tokens
                _, c = dec.step(tok, c, ctx + i)
            times.append(time.perf_counter() - t)
        out[f"decode_tok_s@{ctx}"] = steps / min(times)
    out["peak_rss_mb"] = peak_rss_mib()
    return out




def child_interleaved(folders: list[str], threads: int, contexts: list[int], steps: int, reps: int) -> dict:
    """Runs in a fresh process: decode tokens/s of every folder, the models taking turns in
    ``reps`` rounds of ``steps`` single-token steps, so a change of machine load hits all of them
    alike; the speedups come from these figures. Speed = 1 / the median step time over all rounds,
    without each turn's first 2 steps: another session's intra-op threads may still be spinning
    then (ORT's pools spin before they sleep; alternating every token at 2 threads halves the
    speed of all models). Each model's context grows from ``ctx`` by one position per step."""
    import numpy as np

    from swiftsvd_export.backends.onnx.runtime import OrtDecoder

    decs = {f: OrtDecoder(f, threads=threads) for f in folders}
    vocab = json.loads((Path(folders[0]) / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    tok = np.asarray([[1]])
    out: dict = {f: {} for f in folders}
    for ctx in contexts:
        ids = rng.integers(0, vocab, size=(1, ctx))
        caches, pos = {}, ctx + 1
        for f, dec in decs.items():
            _, cache = dec.step(ids, None, 0)
            caches[f] = dec.step(tok, cache, ctx)[1]  # warm-up at this context
        times: dict = {f: [] for f in folders}
        for _ in range(reps):
            for f, dec in decs.items():
                for i in range(steps):
                    t = time.perf_counter()
                    _, caches[f] = dec.step(tok, caches[f], pos + i)
                    if i >= 2:
                        times[f].append(time.perf_counter() - t)
            pos += steps
        for f in folders:
            ms = np.asarray(times[f]) * 1e3
            out[f][f"decode_tok_s@{ctx}"] = 1e3 / float(np.median(ms))
            out[f][f"decode_ms_iqr@{ctx}"] = [float(np.percentile(ms, 25)), float(np.percentile(ms, 75))]
    return out


def _run_child(args: list[str], threads: int, a) -> dict:
    """This script in a fresh process with ``threads`` threads; its last stdout line as JSON."""
    return run_json_child(__file__, [*args, "--prefill", a.prefill, "--contexts", a.contexts,
                                     "--decode-steps", a.decode_steps, "--reps", a.reps],
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--compressed", action="append", default=[], metavar="RATIO=DIR",
                    help="use this compressed folder for RATIO instead of the built-in truncated SVD")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--graph", choices=("traced", "optimum"), default="traced",
                    help="the graph traced from the torch reference (default, as `export` writes it for "
                         "Llama) or optimum's exporter")
    ap.add_argument("--kv-cache", choices=("dense", "latent-v"), default="dense",
                    help="the compressed models' cache (traced graph only): dense (default) or latent-v, "
                         "what `export` ships for a model whose v_proj is factorized everywhere")
    ap.add_argument("--stack-a", choices=("off", "on", "both"), default="off",
                    help="the compressed models' A factors of q/k/v and gate/up as one MatMul each "
                         "(`export --stack-a`): off (default), on, or both (each ratio twice, side by side; "
                         "the fit uses the unstacked ones)")
    ap.add_argument("--attention", choices=("plain", "gqa"), default="plain",
                    help="every model's attention (traced graph, dense cache): plain ONNX ops (default) or "
                         "onnxruntime's GroupQueryAttention with the cache appended in place (`export --attention gqa`)")
    ap.add_argument("--work", default="bench_onnx_work", help="folder for the exported graphs (reused)")
    ap.add_argument("--out", default="bench_onnx.json")
    ap.add_argument("--separate", action="store_true",
                    help="decode speeds from each model's own child process, one after another, instead of "
                         "one child that alternates the models round by round (the default)")
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--child-interleaved", nargs="+", metavar="FOLDER... THREADS", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.kv_cache != "dense" and a.graph != "traced":
        ap.error(f"--kv-cache {a.kv_cache} needs --graph traced")
    if a.attention == "gqa" and (a.graph != "traced" or a.kv_cache != "dense"):
        ap.error("--attention gqa needs --graph traced and --kv-cache dense")
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.prefill, contexts, a.decode_steps, a.reps)))
        return 0
    if a.child_interleaved:
        *folders_, threads = a.child_interleaved
        print(json.dumps(child_interleaved(folders_, int(threads), contexts, a.decode_steps, a.reps)))
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    from swiftsvd_export.backends.onnx.export import export_onnx
    from swiftsvd_export.models import load_model

    work = Path(a.work)
    work.mkdir(exist_ok=True)
    given = dict(c.split("=", 1) for c in a.compressed)
    stacks = {"off": [False], "on": [True], "both": [False, True]}[a.stack_a]
    variants = [("dense", None, False)] + [(f"r{r}" + ("+stack-a" if st else ""), float(r), st)
                                           for r in a.ratios.split(",") for st in stacks]
    summaries, folders = {}, {}
    for name, ratio, stack_a in variants:
        kv_cache = a.kv_cache if ratio is not None else "dense"
        dst = folders[name] = work / (name if a.graph == "optimum" else
                                      f"{name}-traced" + ("" if kv_cache == "dense" else f"-{kv_cache}")
                                      + ("-gqa" if a.attention == "gqa" else ""))
        if not (dst / "summary.json").is_file():
            t = time.time()
            src = given.get(str(ratio)) if ratio is not None else None
            model, tok, _ = load_model(src or "smollm2-135m")
            if ratio is not None and src is None:
                svd_compress(model, ratio)
            export_onnx(src or f"smollm2-135m (truncated SVD r={ratio})" if ratio else "smollm2-135m", dst,
                        model=model, tokenizer=tok, overwrite=True, graph=a.graph, kv_cache=kv_cache,
                        stack_a=stack_a, attention=a.attention)
            print(f"exported {name} in {time.time() - t:.0f}s", file=sys.stderr)
        summaries[name] = json.loads((dst / "summary.json").read_text())

    rows = []
    for name, _, stack_a in variants:
        s = summaries[name]
        wbytes = sum(s["initializer_bytes"].values())
        kv_per_position = s["kv_cache"]["bytes_per_token_fp32"]  # this graph's own layout
        for th in [int(x) for x in a.threads.split(",")]:
            m = _run_child(["--child", str(folders[name]), str(th)], th, a)
            rows.append({"model": name, "threads": th, "file_mb": s["files"]["onnx_bytes"] / 1e6,
                         "weight_bytes": wbytes, "kv_bytes_per_position": kv_per_position,
                         "factorized": s["factorized_linears"], "stack_a": stack_a, **m})
            print(f"  {name} t={th}: {m}", file=sys.stderr)

    if not a.separate:  # decode speeds from one child alternating the models (the separate runs are kept)
        for th in [int(x) for x in a.threads.split(",")]:
            m = _run_child(["--child-interleaved", *map(str, folders.values()), str(th)], th, a)
            for r in rows:
                if r["threads"] == th:
                    for ctx in contexts:
                        r[f"separate_decode_tok_s@{ctx}"] = r[f"decode_tok_s@{ctx}"]
                        r[f"decode_tok_s@{ctx}"] = m[str(folders[r["model"]])][f"decode_tok_s@{ctx}"]
                        r[f"decode_ms_iqr@{ctx}"] = m[str(folders[r["model"]])][f"decode_ms_iqr@{ctx}"]
            print(f"  interleaved t={th}: {m}", file=sys.stderr)
    dense = {r["threads"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        d = dense[r["threads"]]
        r["weight_ratio"] = d["weight_bytes"] / r["weight_bytes"]
        for ctx in contexts:
            kv = ctx * r["kv_bytes_per_position"]
            r[f"target_speedup@{ctx}"] = 0.9 * (d["weight_bytes"] + kv) / (r["weight_bytes"] + kv)
            r[f"speedup@{ctx}"] = r[f"decode_tok_s@{ctx}"] / d[f"decode_tok_s@{ctx}"]
            r[f"target_met@{ctx}"] = r[f"speedup@{ctx}"] >= r[f"target_speedup@{ctx}"]

    head = (f"{'model':13} {'thr':>3} {'file MB':>8} {'wt MB':>7} {'prefill t/s':>11} "
            + " ".join(f"{'dec@' + str(c):>9}" for c in contexts)
            + " " + " ".join(f"{'spd@' + str(c):>8}" for c in contexts)
            + " " + " ".join(f"{'tgt@' + str(c):>8}" for c in contexts) + f" {'RSS MB':>7}")
    print(head)
    for r in rows:
        print(f"{r['model']:13} {r['threads']:>3} {r['file_mb']:>8.1f} {r['weight_bytes'] / 1e6:>7.1f} "
              f"{r['prefill_tok_s']:>11.1f} "
              + " ".join(f"{r[f'decode_tok_s@{c}']:>9.1f}" for c in contexts) + " "
              + " ".join(f"{r[f'speedup@{c}']:>8.2f}" for c in contexts) + " "
              + " ".join(f"{r[f'target_speedup@{c}']:>8.2f}" for c in contexts)
              + f" {r['peak_rss_mb']:>7.0f}")
    meta = {"graph": a.graph, "kv_cache_compressed": a.kv_cache, "stack_a": a.stack_a, "attention": a.attention, "decode_speeds": "separate children" if a.separate else "interleaved in one child", "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "prefill": a.prefill,
            "contexts": contexts, "decode_steps": a.decode_steps, "reps": a.reps,
            "compressed_source": given or "truncated SVD in tools/bench_onnx.py"}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    print("ms per token = bytes / bandwidth + fixed, fitted over the models of each thread count "
          "(python tools/benchlib.py fit JSON):")
    print("\n".join(fits_table(fits_of_results(a.out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
