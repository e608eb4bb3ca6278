"""Parity of a GGUF in the patched llama.cpp against the torch model it was exported from.

    python -m swiftsvd_export.backends.gguf.parity MODEL_DIR --types f32 f16 q8_0 [--json out.json]

Same token ids on both sides: logits over ``--positions`` tokens of WikiText-2 test (max |Δlogit|,
top-1 agreement), greedy continuations of 5 prompts, and perplexity over ``--ppl-chunks`` chunks.
Q4_0 factors are quantized with importance weights from ``--imatrix-calib`` (default: the shipped
calibration set; ``--no-imatrix``: plain), as ``export --target gguf`` does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from ...torch_reference import torch_greedy, torch_logits  # noqa: F401 (re-exported)

WIKI_TEST = Path(os.environ.get("SWIFTSVD_WIKITEXT_TEST") or Path(__file__).resolve().parents[4] / "shared"
                 / "data" / "wikitext2" / "wikitext-2-raw-v1.test.nnjoin.txt")
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The main difference between a virus and a bacterium is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return {"positions": n, "max_abs_dlogit": float(np.abs(a - b).max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def nll_from_logits(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(ids[t+1] | ids[:t+1]) and the count."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    tgt = np.asarray(ids[1:])
    return float((lse - x[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def wikitext_ids(tokenizer, n_tokens: int, path: Path = WIKI_TEST) -> list[int]:
    text = path.read_text(encoding="utf-8")[: max(20000, n_tokens * 8)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        text = path.read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:n_tokens]


def run(model_dir: Path, types: list[str], positions: int = 256, n_new: int = 64,
        ppl_chunks: int = 8, ppl_ctx: int = 512, threads: int | None = None, embed_type: str | None = None,
        imatrix_calib: str | Path | None = None, imatrix_samples: int = 16, a_type: str | None = None) -> dict:
    """``imatrix_calib``: the text of the importance pass for Q4_0 (None: plain Q4_0); ``a_type``: the A
    factors' type (default: each factor type)."""
    from transformers import AutoTokenizer

    from ...lowrank import load
    from . import runtime
    from ...channel_importance import measure
    from .writer import export_gguf

    model = load(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = wikitext_ids(tok, max(positions, ppl_chunks * ppl_ctx))
    ref = torch_logits(model, ids[:positions])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    eos = tok.eos_token_id
    ref_greedy = [torch_greedy(model, p, n_new, eos) for p in prompts]
    chunks = [ids[i * ppl_ctx:(i + 1) * ppl_ctx] for i in range(ppl_chunks)]
    nll, cnt = 0.0, 0
    for c in chunks:
        s, k = nll_from_logits(torch_logits(model, c), c)
        nll, cnt = nll + s, cnt + k
    out = {"model_dir": str(model_dir), "positions": positions, "torch_ppl": math.exp(nll / cnt),
           "ppl_tokens": cnt, "a_type": a_type, "types": {}}
    importance = None
    if "q4_0" in [*types, a_type] and imatrix_calib is not None:
        importance = measure(model_dir, imatrix_calib, imatrix_samples, 512)
        out["q4_0_importance"] = {"calibration": str(imatrix_calib), "sequences": importance.chunks,
                                  "tokens": importance.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for t in types:
            path = Path(tmp) / f"m-{t}.gguf"
            export_gguf(model_dir, path, factor_type=t, embed_type=embed_type or
                        ("q8_0" if t == "q4_0" else t), quiet=True, importance=importance, a_type=a_type)
            llm = runtime.open_model(path, n_ctx=max(positions, ppl_ctx, 256), n_threads=threads,
                                     logits_all=True, n_batch=max(positions, ppl_ctx), kv_f32=True)
            r = compare_logits(ref, runtime.logits(llm, ids[:positions]))
            same = [runtime.greedy(llm, p, n_new) == g for p, g in zip(prompts, ref_greedy)]
            r["greedy_identical"] = int(sum(same))
            r["greedy_prompts"] = len(same)
            nll, cnt = 0.0, 0
            for c in chunks:
                s, k = nll_from_logits(runtime.logits(llm, c), c)
                nll, cnt = nll + s, cnt + k
            r["llamacpp_ppl"] = math.exp(nll / cnt)
            r["ppl_rel_diff"] = r["llamacpp_ppl"] / out["torch_ppl"] - 1
            r["file_mib"] = path.stat().st_size / 2**20
            out["types"][t] = r
            del llm
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"])
    p.add_argument("--embed-type", default=None, help="embedding type (default: the factor type; q8_0 for q4_0)")
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--ppl-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--imatrix-calib", default=None, metavar="FILE",
                   help="q4_0: calibration text of the importance pass (default: the shipped set)")
    p.add_argument("--no-imatrix", action="store_true", help="q4_0: plain round-to-nearest blocks")
    p.add_argument("--a-type", default=None, help="type of the A factors (default: each --types entry)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from ...channel_importance import calibration_text

    calib = calibration_text(a.imatrix_calib, not a.no_imatrix)
    res = run(a.model_dir, a.types, a.positions, a.new_tokens, a.ppl_chunks, a.ppl_ctx, a.threads, a.embed_type,
              calib, a_type=a.a_type)
    print(f"torch ppl {res['torch_ppl']:.4f} over {res['ppl_tokens']} tokens")
    print(f"{'type':6} {'max|dlogit|':>12} {'top1':>7} {'greedy':>7} {'ppl':>9} {'ppl diff':>9} {'MiB':>7}")
    for t, r in res["types"].items():
        print(f"{t:6} {r['max_abs_dlogit']:12.5f} {r['top1_agreement']:7.2%} "
              f"{r['greedy_identical']}/{r['greedy_prompts']:<5} {r['llamacpp_ppl']:9.4f} "
              f"{r['ppl_rel_diff']:+9.3%} {r['file_mib']:7.1f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
