#!/usr/bin/env python3
"""Benchmark the ONNX weight quantizations of one model side by side: size, accuracy, decode speed.

Each variant is exported from the same model folder as ``export --target onnx`` does by default
(4-bit weights importance-weighted on the shipped calibration set; ``MODE@LEVEL`` sets
MatMulNBits' accuracy level, e.g. ``int8@1``). Accuracy is measured against the fp32 graph on
``--tokens`` tokens of WikiText-2 test: perplexity, mean KL(fp32 || variant), top-1 agreement, max
|Δlogit|. Decode tokens/s at context 128 comes from one child process per thread count in which
the variants take turns (``bench_onnx.py``'s interleaved child), so machine load hits them alike.

    python tools/bench_onnx_quant.py --out bench_out/onnx-quant.json                 # dense SmolLM2
    python tools/bench_onnx_quant.py --model out/smol-0.4 --variants fp32 int8 int8@1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import run_json_child  # noqa: E402

BENCH_ONNX = Path(__file__).resolve().parent / "bench_onnx.py"
SHARED = Path(os.environ.get("SWIFTSVD_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
DEFAULT_TEXT = SHARED / "wikitext2" / "wikitext-2-raw-v1.test.nnjoin.txt"


def parse_variant(v: str) -> tuple[str, int | None]:
    mode, _, level = v.partition("@")
    return mode, int(level) if level else None


def export_variant(model_dir: str, variant: str, dst: Path) -> dict:
    from swiftsvd_export.backends.onnx.export import export_onnx
    from swiftsvd_export.channel_importance import calibration_text

    mode, level = parse_variant(variant)
    if not (dst / "summary.json").is_file():
        t = time.time()
        export_onnx(model_dir, dst, quantize="none" if mode == "fp32" else mode, accuracy_level=level,
                    overwrite=True, kv_cache=None, imatrix_calib=calibration_text(None))  # as the CLI's defaults
        print(f"exported {variant} in {time.time() - t:.0f}s", file=sys.stderr)
    return json.loads((dst / "summary.json").read_text())


def accuracy(folders: dict[str, Path], ids: list[int]) -> dict[str, dict]:
    """Each variant's logits on ``ids`` against the first (fp32) variant's."""
    import numpy as np

    from swiftsvd_export.backends.onnx.runtime import OrtDecoder

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    out, ref, ref_raw = {}, None, None
    for name, folder in folders.items():
        raw = OrtDecoder(folder).logits(np.asarray([ids]))[0]
        lp = logp(raw)
        r = {"ppl": float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))}
        if ref is None:
            ref, ref_raw = lp, raw
        else:
            r.update(kl=float((np.exp(ref) * (ref - lp)).sum(-1).mean()),
                     top1=float((lp.argmax(-1) == ref.argmax(-1)).mean()),
                     max_abs_logit=float(np.abs(raw - ref_raw).max()))
        out[name] = r
        print(f"  {name}: {r}", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: python tools/bench_onnx_quant.py --variants fp32 int8 int8@1 "
                                        "--threads 2 --out bench_out/onnx-quant.json")
    ap.add_argument("--model", default="smollm2-135m", help="model folder (compressed or dense), default SmolLM2")
    ap.add_argument("--variants", nargs="+", default=["fp32", "int8", "int8@1", "int4", "int8-dynamic"],
                    help="fp32 first (the reference), then --quantize modes, MODE@LEVEL for an accuracy level")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--tokens", type=int, default=512, help="WikiText-2 test tokens for the accuracy figures")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="bench_onnx_quant_work", help="folder for the exported graphs (reused)")
    ap.add_argument("--out", default="bench_onnx_quant.json")
    a = ap.parse_args()
    if a.variants[0] != "fp32":
        ap.error("the first variant must be fp32, the reference of the accuracy figures")
    text = Path(a.text)
    if not text.is_file():
        ap.error(f"{text}: no such file (WikiText-2 test, joined rows; --text FILE)")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    work = Path(a.work) / Path(a.model).name
    work.mkdir(parents=True, exist_ok=True)
    folders, summaries = {}, {}
    for v in a.variants:
        folders[v] = work / v.replace("@", "-acc")
        summaries[v] = export_variant(a.model, v, folders[v])
    ids = AutoTokenizer.from_pretrained(folders["fp32"])(text.read_text()[:200_000])["input_ids"][:a.tokens]
    acc = accuracy(folders, ids)
    speed = {}
    for th in a.threads:
        m = run_json_child(BENCH_ONNX, ["--child-interleaved", *map(str, folders.values()), th,
                                        "--contexts", 128, "--decode-steps", a.decode_steps, "--reps", a.reps],
                           env=dict(os.environ, OMP_NUM_THREADS=str(th)))
        speed[th] = {v: m[str(folders[v])]["decode_tok_s@128"] for v in a.variants}

    rows = []
    for v in a.variants:
        q = summaries[v]["quantization"]
        rows.append({"variant": v, "file_mb": summaries[v]["files"]["onnx_bytes"] / 1e6,
                     "accuracy_level": q.get("accuracy_level"), **acc[v],
                     **{f"decode_tok_s@128_{th}t": speed[th][v] for th in a.threads}})
    head = ["variant", "file MB", "ppl", "KL vs fp32", "top-1 vs fp32", "max |Δlogit|"] + \
           [f"decode tok/s @128, {th}t" for th in a.threads]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["variant"], f"{r['file_mb']:.1f}", f"{r['ppl']:.2f}", f"{r.get('kl', 0):.4f}",
                 f"{100 * r.get('top1', 1):.1f} %", f"{r.get('max_abs_logit', 0):.3g}"] + \
                [f"{r[f'decode_tok_s@128_{th}t']:.1f}" for th in a.threads]
        print("| " + " | ".join(cells) + " |")
    out = {"model": a.model, "tokens": len(ids), "text": str(text), "threads": a.threads,
           "decode_steps": a.decode_steps, "reps": a.reps, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
