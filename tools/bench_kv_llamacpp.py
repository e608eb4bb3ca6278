#!/usr/bin/env python3
"""KV cache layouts in the patched llama.cpp: dense vs latent-v vs latent-kv (not a test).

    python tools/bench_kv_llamacpp.py --model-dir out/smol-r0.4 --contexts 256 1024 2048

``--model-dir`` is a compressed folder whose k_proj/v_proj are factorized in every layer; when it does
not exist it is made with ``swiftsvd-export compress smollm2-135m DIR --ratio 0.4 --rank-multiple 32
--calib <WikiText-2 train prefix>``. Each layout is exported as an F16 GGUF (``--kv-cache``, F16 KV
cache, flash attention off as in llama-cpp-python's default), and each (layout, context) runs in a
child process: fill the cache with context − ``--decode`` WikiText-2 test tokens, then decode
``--decode`` tokens ``--repeats`` times from the same point (median of llama.cpp's own timings,
llama_perf_context). KV bytes per token are computed from the GGUF's ranks and read back from
llama.cpp's ``llama_kv_cache: size = ...`` log line; peak RSS is the child's VmHWM.
Writes a Markdown table, ``--json`` and a PNG of decode tokens/s against context.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import run_json_child  # noqa: E402
from swiftsvd_export.memory import peak_rss_mib  # noqa: E402

LAYOUTS = ("dense", "latent-v", "latent-kv")
CALIB = ROOT.parent / "shared" / "data" / "wikitext2" / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wikitext-2-raw-v1.test.nnjoin.txt"


def child(gguf: str, n_ctx: int, n_decode: int, repeats: int, threads: int) -> dict:
    """One layout at one context, in its own process (so peak RSS is this configuration's)."""
    from swiftsvd_export.backends.gguf import runtime

    llm = runtime.open_model(gguf, n_ctx=n_ctx, n_threads=threads, n_batch=512)
    kv = runtime.kv_cache_log()
    ids = llm.tokenize(TEXT.read_text(encoding="utf-8")[: n_ctx * 12].encode(), add_bos=False)
    if len(ids) < n_ctx:
        raise SystemExit(f"only {len(ids)} tokens of text for context {n_ctx}")
    prefill = n_ctx - n_decode
    llm.reset()
    runtime.perf_reset(llm)
    llm.eval(ids[:prefill])
    runtime.sync(llm)
    p = runtime.perf(llm)
    speeds = []
    for _ in range(repeats):
        llm.n_tokens = prefill  # the next eval drops the decoded cells and decodes them again
        runtime.perf_reset(llm)
        for t in ids[prefill:n_ctx]:
            llm.eval([t])
            runtime.sync(llm)
        d = runtime.perf(llm)
        speeds.append(d["n_eval"] / (d["t_eval_ms"] / 1e3))
    return {"kv_log": kv, "prefill_tok_s": p["n_p_eval"] / (p["t_p_eval_ms"] / 1e3),
            "decode_tok_s": statistics.median(speeds), "decode_tok_s_runs": speeds,
            "peak_rss_mib": peak_rss_mib()}


def computed_kv(gguf: Path, elt_bytes: int = 2) -> dict:
    """KV bytes per token from the GGUF: per layer a K row (d_kv, or k_K when K is latent) and a V row."""
    import gguf as gg

    from swiftsvd_export.backends.gguf.writer import KV_LAYOUT_KEY

    r = gg.GGUFReader(str(gguf))

    def meta(key: str) -> int:
        f = r.fields[f"llama.{key}"]
        return int(f.parts[f.data[0]][0])

    n_layer = meta("block_count")
    d_kv = meta("embedding_length") // meta("attention.head_count") * meta("attention.head_count_kv")
    layout = list(r.fields[KV_LAYOUT_KEY].contents()) if KV_LAYOUT_KEY in r.fields else [0] * n_layer
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    rows = 0
    for il, bits in enumerate(layout):
        rows += shapes[f"blk.{il}.attn_k_lr_b.weight"][0] if bits & 2 else d_kv  # B is {k, out}
        rows += shapes[f"blk.{il}.attn_v_lr_b.weight"][0] if bits & 1 else d_kv
    return {"n_layer": n_layer, "d_kv": d_kv, "bytes_per_token": rows * elt_bytes,
            "dense_bytes_per_token": 2 * n_layer * d_kv * elt_bytes, "fraction": rows / (2 * n_layer * d_kv)}


def ensure_model(model_dir: Path) -> None:
    if (model_dir / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "swiftsvd_export.cli", "compress", "smollm2-135m", str(model_dir),
           "--ratio", "0.4", "--allocation", "uniform", "--rank-multiple", "32", "--calib", str(CALIB)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def plot(rows: list[dict], contexts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layout in LAYOUTS:
        pts = sorted((r["context"], r["decode_tok_s"]) for r in rows if r["layout"] == layout)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=layout)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_xticks(contexts)
    ax.set_title("SmolLM2-135M r0.4, F16, llama.cpp: KV cache layouts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "bench_out" / "smol-r0.4")
    ap.add_argument("--contexts", nargs="+", type=int, default=[256, 1024, 2048])
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per repeat (default 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "kv_llamacpp")
    ap.add_argument("--json", type=Path, default=ROOT / "bench_out" / "kv_llamacpp.json")
    ap.add_argument("--png", type=Path, default=ROOT / "bench_out" / "kv_llamacpp.png")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        gguf, n_ctx, n_decode, repeats, threads = a.child
        print(json.dumps(child(gguf, int(n_ctx), int(n_decode), int(repeats), int(threads))))
        return 0

    from swiftsvd_export.backends.gguf.runtime import patched_lib_dir
    from swiftsvd_export.backends.gguf.writer import export_gguf

    patched_lib_dir()
    ensure_model(a.model_dir)
    a.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sane 2-thread runs on a shared CPU
    rows = []
    for layout in a.layouts:
        path = a.work / f"{layout}-f16.gguf"
        export_gguf(a.model_dir, path, factor_type="f16", embed_type="f16", overwrite=True, quiet=True,
                    kv_cache=layout)
        comp = computed_kv(path)
        for ctx in a.contexts:
            r = run_json_child(__file__, ["--child", path, ctx, a.decode, a.repeats, a.threads], env=env)
            kv = r["kv_log"]
            r.update(layout=layout, context=ctx, computed=comp,
                     kv_bytes_per_token_computed=comp["bytes_per_token"],
                     kv_bytes_per_token_llamacpp=(kv["k_mib"] + kv["v_mib"]) * 2**20 / kv["cells"],
                     kv_mib_llamacpp=kv["mib"], kv_mib_computed=comp["bytes_per_token"] * kv["cells"] / 2**20)
            rows.append(r)
            print(f"  {layout:9} ctx {ctx:5}: decode {r['decode_tok_s']:.1f} tok/s {r['decode_tok_s_runs']}, "
                  f"KV {r['kv_mib_llamacpp']:.2f} MiB, RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    dense = {r["context"]: r for r in rows if r["layout"] == "dense"}
    for r in rows:
        if r["context"] in dense:
            r["decode_vs_dense"] = r["decode_tok_s"] / dense[r["context"]]["decode_tok_s"]
    hdr = ("| layout | context | KV B/token computed | KV B/token llama.cpp | fraction of dense | KV MiB (llama.cpp) "
           "| decode tok/s | × dense | prefill tok/s | peak RSS MiB |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['context']} | {r['kv_bytes_per_token_computed']} | "
                     f"{r['kv_bytes_per_token_llamacpp']:.0f} | {r['computed']['fraction']:.3f} | "
                     f"{r['kv_mib_llamacpp']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r.get('decode_vs_dense', float('nan')):.3f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    print("\n".join(lines))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"model_dir": str(a.model_dir), "threads": a.threads, "decode": a.decode,
                                  "repeats": a.repeats, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
                                  "rows": rows, "table": lines}, indent=2) + "\n")
    plot(rows, a.contexts, a.png)
    print(f"wrote {a.json} and {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
