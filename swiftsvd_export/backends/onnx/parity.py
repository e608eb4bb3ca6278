"""Parity of an exported ONNX folder against the torch (low-rank, fp32) model it came from.

Figures, on the same prompts: max |Δlogit| over all positions and vocabulary, top-1 agreement
over positions, mean KL(p_torch || p_onnx) per position, and greedy generations of
``gen_tokens`` tokens (no EOS stop) compared token for token. ``FP32_MAX_ABS_LOGIT`` is the
pass threshold for an fp32 graph; other precisions have figures only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .runtime import OrtDecoder
from ...torch_reference import torch_greedy, torch_logits  # noqa: F401 (re-exported)

FP32_MAX_ABS_LOGIT = 1e-3
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))






def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]).astype(np.float32)
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"max_abs_logit": float(np.abs(ref - got).max()),
            "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "positions": int(ref.shape[0])}


def parity(model, onnx_folder: str | Path, prompts: list[list[int]], gen_tokens: int = 64,
           threads: int | None = None, decoder: OrtDecoder | None = None,
           max_abs_logit: float | None = FP32_MAX_ABS_LOGIT) -> dict:
    """Compare ``model`` (torch) and the ONNX folder on token-id prompts; see the module doc.

    ``max_abs_logit`` is the pass threshold (None: figures only, for fp16/quantized graphs);
    ``passed`` needs the threshold and identical greedy generations.
    """
    dec = decoder or OrtDecoder(onnx_folder, threads=threads)
    per, refs, gots = [], [], []
    greedy_match, first_mismatch = True, []
    for ids in prompts:
        ref = torch_logits(model, ids)
        got = dec.logits(np.asarray([ids]))[0]
        refs.append(ref)
        gots.append(got)
        g_t = torch_greedy(model, ids, gen_tokens) if gen_tokens else []
        g_o = dec.generate(ids, gen_tokens, stop_at_eos=False)["tokens"] if gen_tokens else []
        same = g_t == g_o
        mism = next((i for i, (a, b) in enumerate(zip(g_t, g_o)) if a != b), None)
        greedy_match &= same
        first_mismatch.append(mism)
        per.append({"prompt_tokens": len(ids), **compare_logits(ref, got), "greedy_identical": same,
                    "greedy_first_mismatch": mism})
    total = compare_logits(np.concatenate(refs), np.concatenate(gots))
    result = {**total, "greedy_tokens": gen_tokens, "greedy_identical": greedy_match,
              "greedy_first_mismatch": first_mismatch, "prompts": per}
    if max_abs_logit is not None:
        result["threshold_max_abs_logit"] = max_abs_logit
        result["passed"] = bool(total["max_abs_logit"] <= max_abs_logit and greedy_match)
    return result


def encode_prompts(tokenizer, prompts=DEFAULT_PROMPTS) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


def main(argv=None) -> int:
    """``python -m swiftsvd_export.backends.onnx.parity MODEL_DIR ONNX_DIR [ONNX_DIR ...]``: print JSON figures."""
    import argparse
    import json

    from ...models import load_model

    ap = argparse.ArgumentParser(description="torch (fp32) vs onnxruntime parity figures")
    ap.add_argument("model_dir")
    ap.add_argument("onnx_dirs", nargs="+")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    model, tok, _ = load_model(a.model_dir)
    prompts = encode_prompts(tok)
    res = {}
    for d in a.onnx_dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        fp32 = s["precision"] == "fp32" and s["quantization"]["mode"] == "none"
        r = parity(model, d, prompts, gen_tokens=a.gen_tokens, threads=a.threads,
                   max_abs_logit=FP32_MAX_ABS_LOGIT if fp32 else None)
        r["variant"] = f"{s['precision']}/{s['quantization']['mode']}"
        r["onnx_bytes"] = s["files"]["onnx_bytes"]
        res[d] = r
        print(json.dumps({k: v for k, v in r.items() if k != "prompts"}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
