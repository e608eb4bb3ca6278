"""The covariance pass: one forward over the calibration set, block by block, with hooks.

For every decoder block it accumulates the input covariance XᵀX once per distinct input
(q/k/v share one, gate/up share one, o and down have their own). Each batch's Gram matrix is
computed in float32 (a BLAS GEMM over at most ``batch x seqlen`` tokens) and added into a
float64 accumulator, which keeps the sum exact to ~1e-7 relative at a fraction of the cost of
a float64 GEMM. The output covariance of a linear is then W·(XᵀX)·Wᵀ.

The pass runs the model one block at a time (as GPTQ does), keeping only the hidden states
between blocks. That makes the sequential mode (block i calibrated on the already-compressed
blocks 0..i-1) the same code path: the callback compresses block i, then its outputs are
recomputed. It also yields the end-to-end importance 1 - cos(block input, block output).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed
from .architectures import ArchSpec
from .devices import to_device
from .errors import SwiftSVDError


@dataclass
class BlockStats:
    index: int
    grams: dict[str, torch.Tensor]  # input-group name -> XᵀX (float64)
    n_tokens: int
    importance: float  # 1 - mean cos(block input, block output)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


class BlockKwargs(dict):
    """The keyword arguments block 0 gets, plus ``by_type``: those of the first block of every
    attention type (``full_attention``, ``sliding_attention``), whose masks differ."""

    by_type: dict[str, dict]


def _attention_type(layer: nn.Module) -> str:
    return getattr(layer, "attention_type", "full_attention")


def kwargs_for(layer: nn.Module, kwargs: dict) -> dict:
    """The keyword arguments for ``layer``: its attention type's (sliding-window mask or not)."""
    by_type = getattr(kwargs, "by_type", None)
    return by_type.get(_attention_type(layer), kwargs) if by_type else kwargs


def _clean(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}


@torch.no_grad()
def _kwargs_by_type(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> dict[str, dict]:
    """Run one sequence up to the first block of the last new attention type, recording the
    keyword arguments of the first block of each type (batch 1: masks broadcast over any batch)."""
    first_of: dict[str, int] = {}
    for i, layer in enumerate(layers):
        first_of.setdefault(_attention_type(layer), i)
    last = max(first_of.values())
    saved: dict[str, dict] = {}
    hooks = []
    for kind, i in first_of.items():
        def hook(_mod, _args, kwargs, kind=kind, stop=i == last):
            saved[kind] = _clean(kwargs)
            if stop:
                raise _Stop
        hooks.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(input_ids=ids[:1], use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return saved


@torch.no_grad()
def capture_block_inputs(model: nn.Module, spec: ArchSpec, ids: torch.Tensor,
                         batch_size: int) -> tuple[torch.Tensor, BlockKwargs]:
    """Hidden states entering block 0 for all sequences, and the keyword arguments blocks get
    (``kwargs_for(layer, kwargs)`` picks a block's own, for models with sliding-window layers)."""
    layers = spec.layers(model)
    hidden_size = model.config.get_text_config().hidden_size
    hidden = torch.empty(ids.shape[0], ids.shape[1], hidden_size, dtype=torch.float32)
    saved: dict = {}
    first = layers[0]

    class Catcher(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_type = _attention_type(first)

        def forward(self, hidden_states, *args, **kwargs):
            saved["hidden"] = hidden_states
            raise _Stop

    layers[0] = Catcher()
    try:
        for start in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[start:start + batch_size], use_cache=False)
            except _Stop:
                pass
            hidden[start:start + batch_size] = saved["hidden"].float()
    finally:
        layers[0] = first
    by_type = _kwargs_by_type(model, layers, ids)
    kwargs = BlockKwargs(by_type[_attention_type(first)])
    kwargs.by_type = by_type
    return hidden, kwargs


def _kwargs_to(kwargs: BlockKwargs, device: torch.device | str) -> BlockKwargs:
    """``kwargs`` (with its per-attention-type variants) moved to ``device``."""
    moved = BlockKwargs(to_device(dict(kwargs), device))
    moved.by_type = {kind: to_device(kw, device) for kind, kw in getattr(kwargs, "by_type", {}).items()}
    return moved


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(hidden) if out is None else out
    kwargs = kwargs_for(layer, kwargs)
    for start in range(0, hidden.shape[0], batch_size):
        out[start:start + batch_size] = _block_output(layer(hidden[start:start + batch_size], **kwargs))
    return out


@torch.no_grad()
def calibrate(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, batch_size: int = 8,
              on_block: Callable[[nn.Module, BlockStats], None] | None = None,
              sequential: bool = False, progress: bool = True, cross: bool = False,
              device: torch.device | str = "cpu") -> list[BlockStats]:
    """Accumulate per-block input covariances over ``ids`` (n, seqlen).

    ``on_block(layer, stats)`` is called once block i's statistics are complete (it may
    replace the block's linears). With ``sequential``, block i+1 then sees the outputs of the
    modified block i; otherwise it sees the dense outputs computed during the pass.

    ``cross`` (sequential only) also carries the dense model's hidden states alongside and
    stores, per input group, the cross-covariance X_cᵀ·X_d between the compressed-path input
    X_c and the dense input X_d in ``stats.extra["cross"]`` (for the least-squares refit of B).

    ``device`` runs each block (moved there for its turn), the hidden states and the Gram
    accumulators there; ``on_block`` gets the block and statistics back in host memory. Under
    torch.distributed each rank calibrates its shard of ``ids`` and the sums are all-reduced
    (see ``distributed``).
    """
    import time

    distributed.begin_pass(sequential, cross)
    ids = distributed.shard(ids)
    model.eval()
    hidden, kwargs = capture_block_inputs(model, spec, ids, batch_size)
    hidden, kwargs = hidden.to(device), _kwargs_to(kwargs, device)
    if not torch.isfinite(hidden).all():
        raise SwiftSVDError("NaN or Inf in the activations entering block 0 (embeddings)")
    outs = torch.empty_like(hidden)
    cross = cross and sequential
    dense_hidden = hidden.clone() if cross else None
    dense_outs = torch.empty_like(hidden) if cross else None
    layers = spec.layers(model)
    results: list[BlockStats] = []
    for i, layer in enumerate(tqdm(layers, desc="calibrating blocks", disable=not progress, unit="block")):
        t0 = time.perf_counter()
        layer_kwargs = kwargs_for(layer, kwargs)
        home = next(layer.parameters()).device
        layer.to(device)
        grams: dict[str, torch.Tensor] = {}
        crosses: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        mode = {"dense": False}
        hooks = []
        for group in spec.groups:
            first = layer.get_submodule(group.linears[0])
            d = first.in_features
            acc = grams[group.name] = torch.zeros(d, d, dtype=torch.float64, device=hidden.device)
            if cross:
                crosses[group.name] = torch.zeros(d, d, dtype=torch.float64, device=hidden.device)

            def hook(_mod, args, acc=acc, gname=group.name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if mode["dense"]:
                    crosses[gname] += (seen.pop(gname).T @ x).double()
                    return
                acc += (x.T @ x).double()
                if cross:
                    seen[gname] = x
            hooks.append(first.register_forward_pre_hook(hook))
        cos_sum = 0.0
        try:
            for start in range(0, hidden.shape[0], batch_size):
                x = hidden[start:start + batch_size]
                y = _block_output(layer(x, **layer_kwargs))
                outs[start:start + batch_size] = y
                if cross:  # the same dense block on the dense stream: X_cᵀX_d and the dense outputs
                    mode["dense"] = True
                    try:
                        xd = dense_hidden[start:start + batch_size]
                        dense_outs[start:start + batch_size] = _block_output(layer(xd, **layer_kwargs))
                    finally:
                        mode["dense"] = False
                cos_sum += torch.nn.functional.cosine_similarity(x, y, dim=-1).double().sum().item()
        finally:
            for h in hooks:
                h.remove()
        n_tokens = hidden.shape[0] * hidden.shape[1]
        cos_sum, n_tokens = distributed.reduce_block(i, [*grams.values(), *crosses.values()], cos_sum, n_tokens)
        for group in spec.groups:
            if not torch.isfinite(grams[group.name]).all():
                name = f"{spec.layers_path}.{i}.{group.linears[0]}"
                raise SwiftSVDError(f"NaN or Inf in the activations at the input of {name}")
        stats = BlockStats(i, to_device(grams, home), n_tokens, 1.0 - cos_sum / n_tokens, time.perf_counter() - t0)
        if cross:
            stats.extra["cross"] = to_device(crosses, home)
        layer.to(home)
        if on_block is not None:
            on_block(layer, stats)
            if sequential:
                layer.to(device)
                distributed.sync_block(layer)
                run_block(layer, hidden, kwargs, batch_size, out=outs)
                layer.to(home)
        if not torch.isfinite(outs).all():
            raise SwiftSVDError(f"NaN or Inf in the activations leaving block {i}")
        results.append(stats)
        hidden, outs = outs, hidden
        if cross:
            dense_hidden, dense_outs = dense_outs, dense_hidden
    return results
