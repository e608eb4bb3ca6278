#!/usr/bin/env python3
"""Benchmark dense vs low-rank GGUFs in the patched llama.cpp (not a test).

    python tools/bench_gguf.py --model dense=smollm2-135m --model 0.2=out/smol-0.2 --model 0.4=out/smol-0.4 \
        --types f16 q8_0 --threads 1 2 --json bench_gguf.json

``--model LABEL=SOURCE``: SOURCE is a model folder (compressed or dense) or ``smollm2-135m``;
``LABEL=svd:R`` makes a plain truncated-SVD model at ratio R (k = floor((1-R)·m·n/(m+n)) rounded
down to a multiple of 32) when no compressed folder is at hand.

Speeds are measured side by side: for each (type, threads) one child process loads every model and
the models take turns of ``--turn`` decoded tokens (default 8), so all models see the same machine
load (this VM's 2 cores are shared). Prefill tokens/s on 128 tokens (median of ``--repeats``) and
decode tokens/s at context 128 and 1024 (the median over ``--decode`` tokens of llama.cpp's own
per-token timing, llama_perf_context, leaving out the first 2 tokens of every turn) come from
llama.cpp; peak RSS is a separate child per model (VmHWM). ``--turn 1`` alternates token by token,
as this benchmark did until 2026-12-01: then every token starts right after another model's, with
that model's data in the caches, a cost a user decoding with one model never pays; it is the same
for every model, so it lowers the measured speedups.
``--wait`` picks OpenMP's wait policy for the children: ggml's barriers between graph nodes are OpenMP
barriers, so ``passive`` puts a thread to sleep and wakes it at every node (~2 per matmul), ``active``
spins. The table also gives the bytes each decoded token reads and the speedup
those bytes predict: all weight tensors (the tied embedding counts once, as the output head) plus,
at context c, the F16 K/V cache rows of the c cached positions that attention reads (the same for
dense and compressed models, so it lowers the predicted speedup at long contexts). ``--flash-attn on``
adds rows with llama.cpp's fused attention. Last comes a fit per cell of ms per token = bytes /
bandwidth + fixed (``benchlib.fit_fixed_cost``): the part of a token its bytes do not explain, against
the largest fixed cost at which the most compressed model could still meet 0.9 × predicted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import CELL, fits_of_results, fits_table, run_json_child  # noqa: E402
from swiftsvd_export.memory import peak_rss_mib  # noqa: E402


def child_rss(gguf: str, threads: int, n_decode: int, prefill: int, contexts: list[int],
              flash_attn: bool = False) -> dict:
    """Peak RSS of one model doing the benchmark's work (its own process: VmHWM is per process)."""
    import numpy as np

    from swiftsvd_export.backends.gguf import runtime

    llm = runtime.open_model(gguf, n_ctx=max(contexts) + n_decode + 8, n_threads=threads, n_batch=512,
                             flash_attn=flash_attn)
    toks = [int(x) for x in np.random.default_rng(0).integers(100, min(llm.n_vocab(), 40000), size=max(contexts) + 8)]
    llm.eval(toks[:max(contexts)])
    for t in toks[max(contexts):]:
        llm.eval([t])
    return {"peak_rss_mib": peak_rss_mib()}


def child_speed(ggufs: list[str], threads: int, n_decode: int, prefill: int, contexts: list[int],
                repeats: int, flash_attn: bool = False, turn: int = 8) -> list[dict]:
    """Prefill and decode speeds of several models, interleaved (same load for all), from llama.cpp's
    timings. Decode: the models take turns of ``turn`` tokens; the first 2 of a turn are left out (the
    first token after a switch pays for the other model's data in the caches)."""
    import numpy as np

    from swiftsvd_export.backends.gguf import runtime

    n_ctx = max(contexts) + n_decode + 8
    llms = [runtime.open_model(g, n_ctx=n_ctx, n_threads=threads, n_batch=512, flash_attn=flash_attn)
            for g in ggufs]
    vocab = min(llm.n_vocab() for llm in llms)
    toks = [int(x) for x in np.random.default_rng(0).integers(100, min(vocab, 40000), size=max(contexts) + n_decode)]
    out: list[dict] = [{} for _ in llms]
    pre: list[list[float]] = [[] for _ in llms]
    for _ in range(repeats):
        for i, llm in enumerate(llms):
            llm.reset()
            runtime.perf_reset(llm)
            llm.eval(toks[:prefill])
            runtime.sync(llm)
            p = runtime.perf(llm)
            pre[i].append(p["n_p_eval"] / (p["t_p_eval_ms"] / 1e3))
    for i in range(len(llms)):
        out[i]["prefill_tok_s"] = float(np.median(pre[i]))
    for ctx in contexts:
        for llm in llms:
            llm.reset()
            llm.eval(toks[:ctx])
            runtime.sync(llm)
            runtime.perf_reset(llm)
        ms: list[list[float]] = [[] for _ in llms]
        last = [0.0] * len(llms)
        warm = min(2, turn - 1)
        for start in range(ctx, ctx + n_decode, turn):
            for i, llm in enumerate(llms):
                for j, t in enumerate(toks[start:min(start + turn, ctx + n_decode)]):
                    llm.eval([t])
                    runtime.sync(llm)
                    total = runtime.perf(llm)["t_eval_ms"]
                    if j >= warm:
                        ms[i].append(total - last[i])
                    last[i] = total
        for i in range(len(llms)):
            q1, med, q3 = np.percentile(ms[i], [25, 50, 75])
            out[i][f"decode_tok_s@{ctx}"] = 1e3 / med
            out[i][f"decode_ms_iqr@{ctx}"] = [float(q1), float(q3)]
    return out


def tensor_bytes(gguf_path: Path) -> tuple[int, int]:
    """(bytes of all weight tensors, F16 K/V cache bytes per cached position over all layers)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def meta(key: str) -> int:
        f = r.fields[f"llama.{key}"]
        return int(f.parts[f.data[0]][0])

    n_embd_kv = meta("embedding_length") // meta("attention.head_count") * meta("attention.head_count_kv")
    kv_per_position = meta("block_count") * 2 * n_embd_kv * 2  # K and V rows, F16
    return int(sum(int(t.n_bytes) for t in r.tensors)), kv_per_position


def make_svd_model(ratio: float, out: Path, source: str = "smollm2-135m", multiple: int = 32) -> Path:
    """Plain truncated SVD of every q/k/v/o/gate/up/down linear (fallback when no compressed folder)."""
    import torch

    from swiftsvd_export.architectures import spec_for
    from swiftsvd_export.atomic import atomic_dir
    from swiftsvd_export.lowrank import LowRankLinear, replace_module, save_lowrank
    from swiftsvd_export.models import load_model
    from swiftsvd_export.ranks import uniform_rank

    if (out / "config.json").is_file():
        return out
    model, tok, _ = load_model(source)
    spec = spec_for(model.config)
    for name in spec.linear_names(model):
        lin = model.get_submodule(name)
        m, n = lin.weight.shape
        k = uniform_rank(m, n, ratio, multiple)
        if k is None:
            continue
        U, S, Vh = torch.linalg.svd(lin.weight.detach().double(), full_matrices=False)
        r = S[:k].sqrt()
        replace_module(model, name, LowRankLinear.from_factors((r[:, None] * Vh[:k]).float(),
                                                               (U[:, :k] * r).float()))
    with atomic_dir(out, overwrite=True) as tmp:
        save_lowrank(model, tmp, dtype="fp32", tokenizer=tok,
                     manifest={"method": "svd (bench_gguf fallback)", "ratio": ratio})
    return out


def resolve_model(label: str, src: str, work: Path) -> Path:
    if src.startswith("svd:"):
        return make_svd_model(float(src[4:]), work / f"svd-{src[4:]}")
    if src == "smollm2-135m":
        from swiftsvd_export.models import resolve

        return resolve(src)
    return Path(src)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=SOURCE")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--decode", type=int, default=48, help="tokens decoded per context (default 48)")
    ap.add_argument("--turn", nargs="+", type=int, default=[8],
                    help="tokens each model decodes before the next one's turn, each a set of rows (default 8; "
                         "1 = token by token, the first 2 of a longer turn are not timed)")
    ap.add_argument("--repeats", type=int, default=5, help="prefill repeats (default 5)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--work", type=Path, default=None, help="where GGUFs are written (default: cache)")
    ap.add_argument("--json", type=Path, default=Path("bench_gguf.json"))
    ap.add_argument("--wait", nargs="+", choices=["default", "active", "passive"], default=["active", "passive"],
                    help="OMP_WAIT_POLICY for multi-threaded runs, each a set of rows (default: active and "
                         "passive; 'default' leaves it unset, as users run; 1 thread has no barriers and runs once)")
    ap.add_argument("--flash-attn", nargs="+", choices=["off", "on"], default=["off"],
                    help="llama.cpp's flash attention, each a set of rows (default: off; 'on' runs ggml-cpu's "
                         "fused attention, which splits one token's attention over the cached positions)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.child_rss:
            print(json.dumps(child_rss(a.child[0], a.threads[0], a.decode, a.prefill, a.contexts,
                                       a.flash_attn == ["on"])))
        else:
            print(json.dumps(child_speed(a.child, a.threads[0], a.decode, a.prefill, a.contexts, a.repeats,
                                         a.flash_attn == ["on"], a.turn[0])))
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    from swiftsvd_export.backends.gguf.runtime import patched_lib_dir
    from swiftsvd_export.backends.gguf.writer import export_gguf
    from swiftsvd_export.paths import cache_root

    patched_lib_dir()
    work = a.work or cache_root() / "bench_gguf"
    work.mkdir(parents=True, exist_ok=True)
    models = a.model or ["dense=smollm2-135m", "0.2=svd:0.2", "0.4=svd:0.4"]
    # one BLAS thread in the children: numpy's OpenBLAS threads would otherwise compete for the 2 cores
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")

    def run_child(args: list[str], wait: str):
        policy = {} if wait == "default" else {"OMP_WAIT_POLICY": wait.upper()}
        return run_json_child(__file__, args, env={**{k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}, **policy})

    common = ["--decode", str(a.decode), "--prefill", str(a.prefill), "--repeats", str(a.repeats),
              "--contexts", *map(str, a.contexts)]
    rows = []
    for t in a.types:
        paths: dict[str, Path] = {}
        for spec in models:
            label, src = spec.split("=", 1)
            folder = resolve_model(label, src, work)
            path = work / f"{label}-{t}.gguf"
            if not path.is_file() or path.stat().st_mtime < max(
                    (folder / "model.safetensors").stat().st_mtime, Path(export_gguf.__code__.co_filename).stat().st_mtime):
                # dense KV cache for every model: this compares weights (issue 5); KV layouts: bench_kv_llamacpp.py
                export_gguf(folder, path, factor_type=t, embed_type=t, overwrite=True, quiet=True, kv_cache="dense")
            paths[label] = path
        rss = {label: run_child(["--child", str(p), "--child-rss", "--threads", "1", *common], "passive")
               for label, p in paths.items()}
        sizes = {label: tensor_bytes(p) for label, p in paths.items()}  # (weight bytes, KV bytes per position)
        for fa in a.flash_attn:
            for th in a.threads:
                for wait, turn in itertools.product(["passive"] if th == 1 else a.wait, a.turn):
                    res = run_child(["--child", *map(str, paths.values()), "--threads", str(th),
                                     "--flash-attn", fa, "--turn", str(turn), *common], wait)
                    for (label, path), r in zip(paths.items(), res):
                        nbytes, kv_per_position = sizes[label]
                        r.update(model=label, source=str(path), type=t, threads=th, flash_attn=fa, turn=turn,
                                 omp_wait_policy=wait if th > 1 else "-", file_mib=path.stat().st_size / 2**20,
                                 bytes_per_token=nbytes, kv_bytes_per_position=kv_per_position, **rss[label])
                        rows.append(r)
                        print(f"  {label:6} {t:5} {th}t {r['omp_wait_policy']:7} fa={fa} turn={turn}: " + ", ".join(
                            f"{k}={v:.1f}" for k, v in r.items() if isinstance(v, float)), flush=True)

    dense = {tuple(r[k] for k in CELL): r for r in rows if r["model"] == "dense"}
    for r in rows:
        d = dense.get(tuple(r[k] for k in CELL))
        if d:
            r["expected_speedup"] = d["bytes_per_token"] / r["bytes_per_token"]
            for ctx in a.contexts:
                kv = ctx * r["kv_bytes_per_position"]
                expected = (d["bytes_per_token"] + kv) / (r["bytes_per_token"] + kv)
                r[f"expected_speedup@{ctx}"] = expected
                r[f"speedup@{ctx}"] = r[f"decode_tok_s@{ctx}"] / d[f"decode_tok_s@{ctx}"]
                r[f"meets_0.9x_target@{ctx}"] = r[f"speedup@{ctx}"] >= 0.9 * expected
    hdr = ("| model | type | threads | wait | flash attn | turn | file MiB | prefill tok/s | " +
           " | ".join(f"decode tok/s @{c}" for c in a.contexts) +
           " | peak RSS MiB | predicted speedup @" + " / @".join(map(str, a.contexts)) +
           " | speedup @" + " / @".join(map(str, a.contexts)) + " | ≥ 0.9 × predicted |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        sp = " / ".join(f"{r.get(f'speedup@{c}', float('nan')):.2f}" for c in a.contexts)
        ex = " / ".join(f"{r.get(f'expected_speedup@{c}', float('nan')):.2f}" for c in a.contexts)
        met = " / ".join("yes" if r.get(f"meets_0.9x_target@{c}") else "no" for c in a.contexts)
        lines.append(f"| {r['model']} | {r['type']} | {r['threads']} | {r['omp_wait_policy']} | {r['flash_attn']} | {r['turn']} | {r['file_mib']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | " +
                     " | ".join(f"{r[f'decode_tok_s@{c}']:.1f}" for c in a.contexts) +
                     f" | {r['peak_rss_mib']:.0f} | {ex} | {sp} | {'—' if r['model'] == 'dense' else met} |")
    print("\n".join(lines))
    a.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                                  "decode_tokens": a.decode, "prefill_repeats": a.repeats,
                                  "llama_cpp_lib": os.environ.get("LLAMA_CPP_LIB_PATH") or str(patched_lib_dir()),
                                  "rows": rows, "table": lines}, indent=2) + "\n")
    print("\nms per token = bytes / bandwidth + fixed, fitted over the models of each cell "
          "(python tools/benchlib.py fit JSON):")
    print("\n".join(fits_table(fits_of_results(a.json))))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
