#!/usr/bin/env python3
"""Benchmark layer streaming (compress --stream / --max-memory) against in-memory compression (not a test).

Every run is a separate ``swiftsvd-export compress`` process (--no-cache, so each one calibrates),
its VmRSS and VmHWM sampled from /proc at 20 Hz until it exits; streaming runs also report their
own VmHWM. This parent process never imports torch.

1. SmolLM2-135M (its converted safetensors folder, and the embedded Q4_1 GGUF read directly),
   calibration 32 x 512 tokens of WikiText-2 train (seed 0), ratio 0.2: in memory; streamed
   from the folder; streamed from the GGUF; streamed at the smallest --max-memory it accepts
   (taken from the error a too-small limit prints). The streamed weights are compared with the
   in-memory ones.
2. A synthetic Llama of about 1.4B parameters (hidden 2048, 24 layers, intermediate 5632, 32
   heads, SmolLM2's 49152-token vocabulary and tokenizer, untied head, random fp16 weights),
   written as 1 GB safetensors shards with an index under /tmp tensor by tensor (never the
   whole model in memory), compressed with --max-memory 8GB on 8 x 256 calibration tokens.

    python tools/bench_streaming.py                # both parts (~15 min on 2 cores)
    python tools/bench_streaming.py --skip-synth   # SmolLM2 only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "wikitext2" / "wikitext-2-raw-v1.train.prefix1MB.txt"
SMOL = next((Path.home() / ".cache" / "swiftsvd-export" / "models").glob("SmolLM2-135M-Instruct*"), None)
SYNTH = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
             num_attention_heads=32, num_key_value_heads=32)
GiB = 2**30

sys.path.insert(0, str(ROOT))
from swiftsvd_export.memory import rss_bytes  # noqa: E402


def run_compress(name: str, args: list[str], env: dict) -> dict:
    """One compress process with its RSS sampled; returns the figures and the JSON summary."""
    cmd = [sys.executable, "-m", "swiftsvd_export.cli", "compress", *args, "--no-cache", "--json", "--overwrite"]
    print(f"[{name}] {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        samples, hwm = [], 0
        while p.poll() is None:
            now, peak = rss_bytes(p.pid)
            if now:
                samples.append((round(time.perf_counter() - t0, 2), now))
                hwm = max(hwm, peak)
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    row = {"name": name, "args": args, "rc": p.returncode, "wall_s": wall,
           "sampled_max_rss": max((r for _, r in samples), default=0), "vmhwm": hwm,
           "timeline": samples[::20]}  # one point a second
    if p.returncode != 0:
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        print(f"[{name}] failed: {row['error']}", file=sys.stderr)
        return row
    summary = json.loads(stdout)
    row["summary"] = {k: summary[k] for k in ("achieved_ratio", "normalized_reconstruction_error", "weights_bytes",
                                              "timings", "streaming") if k in summary}
    return row


def same_weights(a: Path, b: Path) -> dict:
    """Max |difference| over the tensors of two outputs (in a child: this parent stays torch-free)."""
    code = ("import sys, json, torch; from safetensors.torch import load_file\n"
            "a, b = (load_file(p + '/model.safetensors') for p in sys.argv[1:])\n"
            "d = max((a[k].float() - b[k].float()).abs().max().item() for k in a) if set(a) == set(b) else None\n"
            "print(json.dumps({'same_names': set(a) == set(b), 'max_abs_diff': d, 'tensors': len(a)}))")
    r = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def make_synth(folder: Path) -> None:
    """Child mode: the synthetic checkpoint, shards written tensor by tensor in 64 MB chunks."""
    sys.path.insert(0, str(ROOT))
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from swiftsvd_export.safetensors_writer import SafetensorsWriter

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = json.loads((SMOL / "config.json").read_text())
    cfg = LlamaConfig(**SYNTH, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.get("bos_token_id"), eos_token_id=tok.get("eos_token_id"), torch_dtype="float16")
    cfg.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SMOL / f, tmp / f)
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        if cur and size + n > 10**9:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = shape, size + n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(tmp / fname, {k: (torch.float16, s) for k, s in shard.items()}, {"format": "pt"})
        for name, shape in shard.items():
            g = torch.Generator().manual_seed(sum(map(ord, name)) * 1009 + len(name))
            if len(shape) == 1:
                w.write(name, torch.ones(shape))
                continue
            step = max(1, (64 << 20) // (4 * shape[1]))
            for r in range(0, shape[0], step):
                w.write(name, torch.randn(min(step, shape[0] - r), shape[1], generator=g) * 0.02, row=r)
        w.close()
        weight_map.update({k: fname for k in shard})
        total += sum(2 * int(torch.Size(s).numel()) for s in shard.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    tmp.rename(folder)
    print(json.dumps({"params": total // 2, "shards": len(shards)}))


def plot(rows: list[dict], path: Path, limit: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, part in zip(axes, ("smollm2", "synthetic")):
        for r in (r for r in rows if r["part"] == part and r.get("timeline")):
            t, rss = zip(*r["timeline"])
            ax.plot(t, [x / GiB for x in rss], label=r["name"])
        if part == "synthetic" and limit:
            ax.axhline(limit / GiB, color="k", ls="--", lw=1, label="--max-memory")
        ax.set_xlabel("seconds")
        ax.set_ylabel("VmRSS (GiB)")
        ax.set_title(part)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(rows: list[dict]) -> str:
    lines = ["| part | run | peak RSS (VmHWM) | max sampled VmRSS | streaming's own VmHWM | activations | time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r.get("summary", {}).get("streaming", {})
        own = f"{st['peak_rss'] / GiB:.2f} GiB" if st else "-"
        lim = f" (limit {st['max_memory'] / GiB:.2f} GiB)" if st.get("max_memory") else ""
        status = f"{r['wall_s']:.0f} s" if r["rc"] == 0 else f"failed: {r.get('error', '')[:60]}"
        lines.append(f"| {r['part']} | {r['name']}{lim} | {r['vmhwm'] / GiB:.2f} GiB | {r['sampled_max_rss'] / GiB:.2f} GiB "
                     f"| {own} | {st.get('activations', '-')} | {status} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-smol", action="store_true")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--minimum-only", action="store_true",
                    help="SmolLM2: only the run at the stated minimum --max-memory (other rows kept from --out)")
    ap.add_argument("--synth-dir", default="/tmp/swiftsvd-synth-1.4b")
    ap.add_argument("--work", default="/tmp/swiftsvd-bench-streaming")
    ap.add_argument("--max-memory", default="8GB")
    ap.add_argument("--synth-nsamples", type=int, default=8)
    ap.add_argument("--synth-seqlen", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "tools" / "results" / "streaming-2026-11-30.json"))
    ap.add_argument("--make-synth", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make_synth:
        make_synth(Path(a.make_synth))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SWIFTSVD_CACHE=str(work / "cache"))
    calib = ["--calib", str(TRAIN), "--ratio", "0.2", "--allocation", "uniform"]
    rows = []
    if not a.skip_smol:
        if SMOL is None:
            raise SystemExit("SmolLM2-135M is not converted yet: run `swiftsvd-export compress smollm2-135m ...` once")
        smol = calib + ["--nsamples", "32", "--seqlen", "512"]
        runs = [("in memory", "mem", [str(SMOL), str(work / "mem")] + smol),
                ("stream (folder)", "st", [str(SMOL), str(work / "st")] + smol + ["--stream"]),
                ("stream (GGUF)", "gg", ["smollm2-135m", str(work / "gg")] + smol + ["--stream"])]
        for name, d, args in runs if not a.minimum_only else ():
            rows.append(dict(run_compress(name, args, env), part="smollm2", kind=d))
        probe = run_compress("probe", [str(SMOL), str(work / "x")] + smol + ["--max-memory", "1MB"], env)
        m = re.search(r"give at least --max-memory ([0-9.]+GiB)", probe.get("error", ""))
        if m:
            rows.append(dict(run_compress(f"stream --max-memory {m.group(1)} (the stated minimum)",
                                          [str(SMOL), str(work / "mn")] + smol + ["--max-memory", m.group(1)], env),
                             part="smollm2", kind="mn", stated_minimum=m.group(1), probe_error=probe.get("error")))
        for r in rows:
            if r["kind"] != "mem" and r["rc"] == 0 and (work / "mem").is_dir():
                r["vs_in_memory"] = same_weights(work / "mem", work / r["kind"])
    if not a.skip_synth:
        synth = Path(a.synth_dir)
        if not (synth / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            info = subprocess.run([sys.executable, __file__, "--make-synth", str(synth)], check=True,
                                  capture_output=True, text=True, env=env)
            print(f"wrote {synth} in {time.perf_counter() - t:.0f} s: {info.stdout.strip()}", file=sys.stderr)
        args = [str(synth), str(work / "synth-out")] + calib + [
            "--nsamples", str(a.synth_nsamples), "--seqlen", str(a.synth_seqlen), "--max-memory", a.max_memory]
        rows.append(dict(run_compress(f"stream --max-memory {a.max_memory}", args, env), part="synthetic",
                         kind="synth"))
    print(table(rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": "2026-11-30", "cpus": os.cpu_count(), "smol_calibration": "32 x 512 WikiText-2 train, seed 0",
            "synthetic": dict(SYNTH, dtype="float16", tie_word_embeddings=False,
                              calibration=f"{a.synth_nsamples} x {a.synth_seqlen} WikiText-2 train"),
            "ratio": 0.2, "sampling": "VmRSS/VmHWM from /proc/PID/status every 50 ms"}
    if out.exists() and (a.skip_smol or a.skip_synth or a.minimum_only):  # keep the rows not rerun
        done = {r["kind"] for r in rows}
        rows = [r for r in json.loads(out.read_text()).get("rows", []) if r.get("kind") not in done] + rows
        rows.sort(key=lambda r: ["mem", "st", "gg", "mn", "synth"].index(r.get("kind", "synth")))
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_name(out.stem.replace("streaming", "streaming-rss") + ".png"),
         next((r["summary"]["streaming"]["max_memory"] for r in rows
               if r["part"] == "synthetic" and r.get("summary")), None))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
