"""Perplexity with the WikiText-2 protocol (see ``perplexity.py``) for any runtime: the text is one
token stream (reference tokenizer), cut into non-overlapping windows of ``seqlen`` tokens, each
scored on its ``seqlen − 1`` next-token predictions from a fresh cache. Every artifact gets the
same token ids and windows, so the figures compare runtimes, not tokenizers."""
from __future__ import annotations

import math
from pathlib import Path

from ..backends.gguf.parity import nll_from_logits
from ..errors import SwiftSVDError
from ..perplexity import load_eval_text


def eval_ids(tokenizer, path: Path, n_tokens: int | None) -> list[int]:
    """The first ``n_tokens`` token ids of the text (all of them for None).

    Only a prefix of the text is tokenized when that is enough; the last few tokens of the
    prefix (which the cut may have changed) are never among the ids returned.
    """
    text = load_eval_text(path)
    if n_tokens is not None and len(text) > n_tokens * 8:
        ids = tokenizer(text[: n_tokens * 8], add_special_tokens=False)["input_ids"]
        if len(ids) > n_tokens + 8:
            return ids[:n_tokens]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if n_tokens is None else ids[:n_tokens]


def n_windows(ids: list[int], seqlen: int, max_windows: int) -> int:
    """Windows to score: all that fit, capped by ``max_windows`` (0: no cap)."""
    n = len(ids) // seqlen
    if n == 0:
        raise SwiftSVDError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return min(n, max_windows) if max_windows else n


def perplexity(runner, ids: list[int], seqlen: int, windows: int) -> dict:
    """The report's ``quality`` object for ``runner``."""
    nll, scored = 0.0, 0
    for w in range(windows):
        window = ids[w * seqlen:(w + 1) * seqlen]
        s, k = nll_from_logits(runner.logits(window), window)
        nll, scored = nll + s, scored + k
    return {"ppl": math.exp(nll / scored), "tokens_scored": scored, "seqlen": seqlen, "windows": windows}
