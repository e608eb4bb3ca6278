"""Calibration text sampled from the model itself (data-free calibration, as in LLM-QAT).

Each sequence starts from one token drawn uniformly (seeded) from the ordinary vocabulary and
continues by sampling the model (temperature 1, nucleus top-p 0.95), optionally after
``greedy_prefix`` tokens chosen greedily (LLM-QAT's recipe). The output is JSONL with
one ``{"text": ...}`` record per sequence; nothing licensed is involved, so it can be shipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import atomic_file


@torch.no_grad()
def generate_calibration(model, tokenizer, output: str | Path, nsequences: int = 80, length: int = 512,
                         seed: int = 0, batch_size: int = 16, temperature: float = 1.0, top_p: float = 0.95,
                         overwrite: bool = False, progress: bool = True, greedy_prefix: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)
    starts = vocab[torch.randint(len(vocab), (nsequences,), generator=gen)]
    records = []
    torch.manual_seed(seed)
    model.eval()
    for b in tqdm(range(0, nsequences, batch_size), desc="sampling", disable=not progress, unit="batch"):
        first = starts[b:b + batch_size].unsqueeze(1)
        if greedy_prefix:  # LLM-QAT: the first tokens greedily, so a sequence does not start in noise
            first = model.generate(first, attention_mask=torch.ones_like(first), do_sample=False,
                                   max_new_tokens=greedy_prefix, min_new_tokens=greedy_prefix,
                                   pad_token_id=tokenizer.pad_token_id)
        rest = length - first.shape[1]
        out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=rest,
                             min_new_tokens=rest, pad_token_id=tokenizer.pad_token_id)
        for row in out:
            records.append({"text": tokenizer.decode(row, skip_special_tokens=True)})
    with atomic_file(output, overwrite=overwrite) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in records)
    return {"output": str(output), "sequences": len(records), "tokens": tokens, "seed": seed,
            "length": length, "temperature": temperature, "top_p": top_p, "greedy_prefix": greedy_prefix}
