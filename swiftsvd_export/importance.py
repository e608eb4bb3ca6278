"""Loss importance: the calibration-loss increase when one block alone is compressed.

The cheap block importance, 1 − cos(block input, block output), says how much a block changes
the residual stream, not how much compressing it hurts. The sharper measure (``--importance
loss``) asks the question directly:

    ΔL_b = L(dense model, block b's linears at the uniform rank) − L(dense model)

with L the mean next-token cross-entropy (nats/token) on ``windows`` calibration sequences
(evenly spaced among the calibration windows). The factors come from the cached spectra, so
no decomposition is redone: the dense hidden states entering every block are kept once, and
for block b only blocks b..L−1, the final norm and the LM head run again (Σ_b (L − b) block
passes plus one head pass per block, about 0.6 of L full forwards).

The uniform rank is the ``--ratio`` formula at the budget's ratio rounded to the nearest 0.05
(so that the bisection of ``--max-ppl-increase`` reuses a handful of them). The per-block
values are cached in the statistics entry (``loss-importance.json``, keyed by that ratio, the
rank multiple and the number of windows), so a re-target at a ratio already seen costs nothing;
the file goes with the entry when a stale entry is recomputed, and a garbled one is recomputed.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from .allocation import block_of
from .atomic import atomic_file
from .covariance import capture_block_inputs, run_block
from .ranks import uniform_ranks

log = logging.getLogger(__name__)

CACHE_FILE = "loss-importance.json"


def importance_ratio(shapes: dict[str, tuple[int, int]], budget: int) -> float:
    """The budget's ratio rounded to the nearest 0.05, within [0.05, 0.95]."""
    dense = sum(m * n for m, n in shapes.values())
    return min(max(round((1.0 - budget / dense) * 20) / 20, 0.05), 0.95)


def pick_windows(ids: torch.Tensor, windows: int) -> torch.Tensor:
    """``windows`` calibration sequences spread evenly over the set (all of them if fewer)."""
    n = ids.shape[0]
    if windows >= n:
        return ids
    return ids[torch.linspace(0, n - 1, windows).round().long()]


@torch.no_grad()
def _head_loss(model, hidden: torch.Tensor, ids: torch.Tensor, norm_path: str, batch_size: int = 2) -> float:
    """Mean next-token cross-entropy of the final hidden states (final norm, then the LM head;
    two sequences at a time, as the vocabulary-wide logits are the largest tensor)."""
    norm = model.get_submodule(norm_path)
    head = model.get_output_embeddings()
    nll, count = 0.0, 0
    for start in range(0, hidden.shape[0], batch_size):
        h = norm(hidden[start:start + batch_size])
        logits = head(h)[:, :-1].float()
        target = ids[start:start + batch_size, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum").item()
        count += target.numel()
    return nll / count


@torch.no_grad()
def loss_importance(model, spec, ids: torch.Tensor, ranks: dict[str, int],
                    apply: Callable[[dict[str, int]], dict], restore: Callable[[dict], None],
                    batch_size: int = 4) -> tuple[list[float], float]:
    """(ΔL_b per block, dense loss) on ``ids``: block b's linears in ``ranks`` replaced by
    ``apply`` (returns what ``restore`` puts back), every other block dense."""
    model.eval()
    layers = spec.layers(model)
    hidden, kwargs = capture_block_inputs(model, spec, ids, batch_size)
    inputs = [hidden]
    for layer in layers:
        inputs.append(run_block(layer, inputs[-1], kwargs, batch_size))
    norm_path = spec.layers_path.rsplit(".", 1)[0] + ".norm"
    dense = _head_loss(model, inputs[-1], ids, norm_path)
    deltas = []
    for b in range(len(layers)):
        originals = apply({n: k for n, k in ranks.items() if block_of(n) == b})
        try:
            h = inputs[b]
            for layer in layers[b:]:
                h = run_block(layer, h, kwargs, batch_size)
        finally:
            restore(originals)
        deltas.append(_head_loss(model, h, ids, norm_path) - dense)
    return deltas, dense


class LossImportance:
    """Per-budget loss importance for ``dynamic_ranks``, cached in memory and in ``entry``."""

    def __init__(self, model, spec, shapes, ids: torch.Tensor, apply, restore, multiple: int,
                 windows: int, batch_size: int, entry: str | None = None):
        self.model, self.spec, self.shapes = model, spec, shapes
        self.ids = pick_windows(ids, windows)
        self.apply, self.restore = apply, restore
        self.multiple, self.batch_size = multiple, batch_size
        self.file = Path(entry) / CACHE_FILE if entry else None
        self.used: dict[str, dict] = {}  # what this run computed or read, for the manifest
        self.seconds = 0.0

    def key(self, ratio: float) -> str:
        return f"ratio={ratio:.2f},multiple={self.multiple},windows={self.ids.shape[0]}"

    def _read(self) -> dict:
        if self.file is None or not self.file.is_file():
            return {}
        try:
            data = json.loads(self.file.read_text())
            if not all(isinstance(v, dict) and all(math.isfinite(x) for x in v["deltas"]) for v in data.values()):
                raise ValueError("bad entry")
            return data
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            msg = f"loss-importance cache {self.file} is corrupt ({type(e).__name__}); recomputing it"
            log.warning(msg)
            print(f"warning: {msg}", file=sys.stderr)
            return {}

    def _write(self, data: dict) -> None:
        if self.file is None:
            return
        with atomic_file(self.file, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=1))

    def __call__(self, budget: int) -> list[float]:
        ratio = importance_ratio(self.shapes, budget)
        key = self.key(ratio)
        if key in self.used:
            return self.used[key]["deltas"]
        data = self._read()
        n_blocks = len(self.spec.layers(self.model))
        if key not in data or len(data[key].get("deltas", [])) != n_blocks:
            t = time.perf_counter()
            ranks = uniform_ranks(self.shapes, ratio, self.multiple)
            deltas, dense = loss_importance(self.model, self.spec, self.ids, ranks, self.apply, self.restore,
                                            self.batch_size)
            seconds = time.perf_counter() - t
            self.seconds += seconds
            data[key] = {"ratio": ratio, "dense_loss": dense, "deltas": deltas, "seconds": seconds}
            self._write(data)
        self.used[key] = data[key]
        return data[key]["deltas"]
