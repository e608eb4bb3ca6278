"""The torch side of every parity check: full-sequence logits and greedy decoding with the KV cache."""
from __future__ import annotations

import numpy as np
import torch


def torch_logits(model, ids: list[int]) -> np.ndarray:
    """Logits (positions x vocab, float32) of one sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def torch_greedy(model, ids: list[int], n_new: int, eos: int | None = None) -> list[int]:
    """Greedy continuation of ``n_new`` tokens with the torch KV cache; stops at ``eos`` if given."""
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        past = res.past_key_values
        for i in range(n_new):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if (eos is not None and nxt == eos) or i == n_new - 1:
                break
            res = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
    return out
