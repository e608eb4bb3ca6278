#!/usr/bin/env python3
"""Benchmark the KV cache layouts of a compressed SmolLM2-135M on onnxruntime (CPU).

Graphs (one export folder each, made here when missing):

- ``dense``: optimum's exporter (the shipping graph before 2026-11-30), dense K/V cache;
- ``dense-traced``: a dense cache traced from the torch reference, the like-for-like baseline
  for the latent graphs (same tracer, same attention code);
- ``latent-v``: V cached as A_V·x; ``latent-kv``: K and V cached as latents.

For each graph and context C (fresh child process, so peak RSS is its own): prefill C tokens of
WikiText-2 test in chunks, read the cache actually returned (sum of the present tensors' nbytes),
then time greedy decode: warm-up steps, then ``--reps`` runs of ``--steps`` tokens, each from
the same prefilled cache; decode tok/s is the median. KV bytes per token are computed from the
shapes (``latent_kv.kv_bytes_per_token``) and measured (cache nbytes / C).

    swiftsvd-export compress smollm2-135m bench_out/smol-r0.4 --ratio 0.4 --allocation uniform --rank-multiple 32 \\
        --calib ../shared/data/wikitext2/wikitext-2-raw-v1.train.prefix1MB.txt --dtype fp32
    python tools/bench_kv_cache.py --compressed bench_out/smol-r0.4 --out bench_out/kv_cache.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import run_json_child  # noqa: E402
from swiftsvd_export.memory import peak_rss_mib  # noqa: E402

GRAPHS = {"dense": dict(kv_cache="dense", graph="optimum"), "dense-traced": dict(kv_cache="dense", graph="traced"),
          "latent-v": dict(kv_cache="latent-v"), "latent-kv": dict(kv_cache="latent-kv")}
TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext2/wikitext-2-raw-v1.test.nnjoin.txt"


def export_all(compressed: Path, out_dir: Path, graphs: list[str]) -> dict[str, Path]:
    """One export folder per graph, reused when already there."""
    from swiftsvd_export.backends.onnx.export import export_onnx

    folders = {}
    for name in graphs:
        folder = out_dir / f"onnx-{name}"
        if not (folder / "summary.json").is_file():
            t = time.perf_counter()
            export_onnx(compressed, folder, overwrite=True, **GRAPHS[name])
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        folders[name] = folder
    return folders


def child(folder: str, context: int, threads: int, steps: int, reps: int, chunk: int) -> dict:
    """Runs in a fresh process: prefill ``context`` tokens, measure the cache, time decode."""
    import numpy as np

    from swiftsvd_export.backends.onnx.runtime import OrtDecoder, load_tokenizer

    dec = OrtDecoder(folder, threads=threads)
    ids = load_tokenizer(Path(folder)).encode(TEXT.read_text(encoding="utf-8")[: 12 * context]).ids[:context]
    if len(ids) < context:
        raise SystemExit(f"{TEXT} gives only {len(ids)} tokens")
    cache, past = None, 0
    t = time.perf_counter()
    for start in range(0, context, chunk):  # chunked prefill: logits of 2048 x 49152 would dwarf the cache
        logits, cache = dec.step(np.asarray([ids[start:start + chunk]]), cache, past)
        past += len(ids[start:start + chunk])
    prefill_s = time.perf_counter() - t
    measured = sum(c.numpy().nbytes for c in cache)
    first = int(np.argmax(logits[0, -1]))

    def decode(n: int) -> float:
        c, tok, t0 = cache, first, time.perf_counter()
        for i in range(n):
            out, c = dec.step(np.asarray([[tok]]), c, context + i)
            tok = int(np.argmax(out[0, -1]))
        return n / (time.perf_counter() - t0)

    decode(4)  # warm-up
    runs = [decode(steps) for _ in range(reps)]
    return {"context": context, "threads": threads, "layout": dec.layout, "prefill_s": prefill_s,
            "kv_bytes_measured": measured, "kv_bytes_per_token_measured": measured / context,
            "kv_bytes_per_token_graph": dec.bytes_per_token(), "decode_tok_s_runs": runs,
            "decode_tok_s": statistics.median(runs), "peak_rss_mib": peak_rss_mib()}


def run_child(folder: Path, context: int, args) -> dict:
    return run_json_child(__file__, ["--child", folder, "--context", context, "--threads", args.threads,
                                     "--steps", args.steps, "--reps", args.reps, "--chunk", args.chunk])


def table(rows: list[dict]) -> str:
    head = ("| graph | context | KV B/token computed | measured | vs dense | KV MiB | decode tok/s "
            "| vs dense | vs dense-traced | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|")
    speed = {(r["graph"], r["context"]): r["decode_tok_s"] for r in rows}
    lines = [head]
    for r in rows:
        ratio = [f"{r['decode_tok_s'] / speed[(g, r['context'])]:.3f}" if (g, r["context"]) in speed else "-"
                 for g in ("dense", "dense-traced")]
        lines.append(f"| {r['graph']} | {r['context']} | {r['kv_bytes_per_token_computed']} | "
                     f"{r['kv_bytes_per_token_measured']:.0f} | {r['fraction_of_dense']:.4f} | "
                     f"{r['kv_bytes_measured'] / 2**20:.1f} | {r['decode_tok_s']:.1f} | {ratio[0]} | {ratio[1]} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for graph in dict.fromkeys(r["graph"] for r in rows):
        pts = sorted((r["context"], r["decode_tok_s"]) for r in rows if r["graph"] == graph)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=graph)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(f"SmolLM2-135M r0.4, onnxruntime CPU, {rows[0]['threads']} thread(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compressed", type=Path, default=Path("bench_out/smol-r0.4"))
    ap.add_argument("--exports", type=Path, default=None, help="export folders (default: beside --compressed)")
    ap.add_argument("--graphs", default=",".join(GRAPHS))
    ap.add_argument("--contexts", default="256,1024,2048")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench_out/kv_cache.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--context", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.context, args.threads, args.steps, args.reps, args.chunk)))
        return

    from swiftsvd_export.latent_kv import kv_bytes_per_token

    if not (args.compressed / "config.json").is_file():
        raise SystemExit(f"{args.compressed}: compress first (see this script's docstring)")
    folders = export_all(args.compressed, args.exports or args.compressed.parent, args.graphs.split(","))
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for graph, folder in folders.items():
            summary = json.loads((folder / "summary.json").read_text())
            cfg = json.loads((folder / "config.json").read_text())
            r = run_child(folder, context, args)
            computed = kv_bytes_per_token(cfg, summary["ranks"], r["layout"])
            r.update(graph=graph, kv_bytes_per_token_computed=computed,
                     fraction_of_dense=computed / kv_bytes_per_token(cfg, summary["ranks"], "dense"),
                     measured_equals_computed=r["kv_bytes_measured"] == computed * context)
            rows.append(r)
            print(f"{graph:13s} ctx {context:5d}: {r['decode_tok_s']:.1f} tok/s, "
                  f"KV {r['kv_bytes_measured'] / 2**20:.1f} MiB, RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(rows, png)
    args.out.write_text(json.dumps({"compressed": str(args.compressed), "threads": args.threads,
                                    "steps": args.steps, "reps": args.reps, "chunk": args.chunk,
                                    "rows": rows, "plot": str(png)}, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {args.out} and {png}; bench process peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
