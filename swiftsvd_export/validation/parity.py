"""Parity of an artifact against the torch reference on a fixed prompt set.

Figures (over all prompts' positions): max |Δlogit|, top-1 agreement, mean KL(ref ‖ artifact)
per position; and greedy continuations of N tokens, scored by the number of tokens identical
before the first divergence (two continuations that are identical up to the same EOS count as
N). Same token ids on both sides: the reference tokenizer encodes every prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends.gguf.parity import PROMPTS as BUILTIN_PROMPTS
from ..backends.onnx.parity import compare_logits
from ..errors import SwiftSVDError

WIKITEXT_SLICE_TOKENS = 128


def prompt_ids(tokenizer, eval_ids: list[int], prompts_file: Path | None = None) -> list[list[int]]:
    """The built-in prompts (or one per non-empty line of ``prompts_file``) plus a slice of the eval text."""
    if prompts_file is not None:
        if not Path(prompts_file).is_file():
            raise SwiftSVDError(f"prompts file {prompts_file} does not exist")
        texts = [t for t in Path(prompts_file).read_text(encoding="utf-8").splitlines() if t.strip()]
        if not texts:
            raise SwiftSVDError(f"prompts file {prompts_file} has no prompts")
    else:
        texts = list(BUILTIN_PROMPTS)
    out = [tokenizer(t)["input_ids"] for t in texts]
    empty = [t for t, ids in zip(texts, out) if not ids]
    if empty:
        raise SwiftSVDError(f"prompt {empty[0]!r} encodes to no tokens")
    return out + [list(eval_ids[:WIKITEXT_SLICE_TOKENS])]


def match_len(ref: list[int], got: list[int], n: int) -> int:
    """Tokens identical before the first divergence; identical sequences (same EOS stop) count n."""
    if ref == got:
        return n
    return next(i for i, (a, b) in enumerate(zip(ref + [None], got + [None])) if a != b)


@dataclass
class ReferenceOutputs:
    """The reference's logits and greedy continuations, computed once for every artifact."""

    prompts: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]
    greedy_tokens: int

    @classmethod
    def compute(cls, runner, prompts: list[list[int]], greedy_tokens: int) -> "ReferenceOutputs":
        return cls(prompts, [runner.logits(p) for p in prompts],
                   [runner.greedy(p, greedy_tokens) for p in prompts], greedy_tokens)


def parity(ref: ReferenceOutputs, runner) -> dict:
    """The report's ``parity`` object for ``runner`` against ``ref``."""
    got = [runner.logits(p) for p in ref.prompts]
    v = min(min(x.shape[-1] for x in ref.logits), min(x.shape[-1] for x in got))  # padded vocabularies
    c = compare_logits(np.concatenate([x[:, :v] for x in ref.logits]), np.concatenate([x[:, :v] for x in got]))
    n = ref.greedy_tokens
    matches = [match_len(g, runner.greedy(p, n), n) for p, g in zip(ref.prompts, ref.greedy)]
    return {"prompts": len(ref.prompts), "positions": c["positions"], "max_abs_dlogit": c["max_abs_logit"],
            "top1_agreement": c["top1_agree"], "kl_mean": c["kl_mean"],
            "greedy_match_len": float(np.mean(matches)), "greedy_tokens": n}
