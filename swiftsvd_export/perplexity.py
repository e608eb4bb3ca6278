"""Perplexity with the WikiText-2 protocol: the text tokenized as one stream, cut into
non-overlapping windows of ``seqlen`` tokens (the remainder is dropped), every window scored
on its ``seqlen − 1`` next-token predictions."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import SwiftSVDError


def load_eval_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise SwiftSVDError(f"text file {path} does not exist")
    if path.suffix == ".json":  # a JSON list of rows, joined as the WikiText-2 protocol does
        import json

        return "\n\n".join(json.loads(path.read_text(encoding="utf-8")))
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise SwiftSVDError(f"text file {path} is empty")
    return text


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
               progress: bool = True) -> dict:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise SwiftSVDError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    model.eval()
    device = next(model.parameters()).device  # score where the model is (a GPU too)
    nll, scored = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, unit="win"):
        window = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        scored += seqlen - 1
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "seqlen": seqlen,
            "windows": n_windows, "tokens_scored": scored, "tokens_in_text": int(ids.numel())}
