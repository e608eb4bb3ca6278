"""The covariance pass: one forward over the calibration set, block by block, with hooks.

For every decoder block it accumulates the input covariance XᵀX once per distinct input
(q/k/v share one, gate/up share one, o and down have their own). Each batch's Gram matrix is
computed in float32 (BLAS GEMMs over at most ``batch x seqlen`` tokens, upper column blocks
only: it is symmetric) and added into a float64 accumulator, which keeps the sum exact to ~1e-7
relative at a fraction of the cost of a float64 GEMM. The output covariance of a linear is then W·(XᵀX)·Wᵀ.

The pass runs the model one block at a time (as GPTQ does), keeping only the hidden states
between blocks. That makes the sequential mode (block i calibrated on the already-compressed
blocks 0..i-1) the same code path: the callback compresses block i, then its outputs are
recomputed. It also yields the end-to-end importance 1 - cos(block input, block output).
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
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


@contextmanager
def input_hooks(layer: nn.Module, groups, on_input: Callable[[str, torch.Tensor], None], stop: bool = False):
    """Call ``on_input(group name, x)`` with the input (tokens x features, float32) of each group's
    first linear while ``layer`` runs; ``stop`` ends the forward there (only that input is needed)."""
    def hook(_mod, args, gname):
        on_input(gname, args[0].reshape(-1, args[0].shape[-1]).float())
        if stop:
            raise _Stop
    hooks = [layer.get_submodule(g.linears[0]).register_forward_pre_hook(partial(hook, gname=g.name)) for g in groups]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


GRAM_BLOCK = 288  # column block width of the Gram GEMMs (see add_gram)


def _gram_edges(n: int) -> list[int]:
    blocks = max(1, round(n / GRAM_BLOCK))
    return [round(i * n / blocks) for i in range(blocks + 1)]


def add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx (float64 acc, float32 x), upper block triangle only: in b column blocks a
    symmetric product needs (b + 1) / 2b of a full GEMM's flops. :func:`mirror_gram` fills the
    lower blocks once the sum is complete."""
    edges = _gram_edges(acc.shape[0])
    for lo, hi in zip(edges, edges[1:]):
        acc[lo:hi, lo:] += (x[:, lo:hi].T @ x[:, lo:]).double()


def mirror_gram(acc: torch.Tensor) -> torch.Tensor:
    """Copy the upper blocks that :func:`add_gram` accumulated onto the lower ones (in place)."""
    edges = _gram_edges(acc.shape[0])
    for lo, hi in zip(edges, edges[1:]):
        acc[hi:, lo:hi] = acc[lo:hi, hi:].T
    return acc


def gram_accumulators(layer: nn.Module, groups, device: torch.device | str = "cpu"):
    """Zeroed float64 XᵀX per group and the ``on_input`` callback that adds a batch to them: each
    batch's Gram is fp32 GEMMs, summed in float64 (see the module docstring). Only the upper block
    triangle is summed: :func:`mirror_gram` each one when the pass is over."""
    grams = {g.name: torch.zeros(layer.get_submodule(g.linears[0]).in_features,
                                 layer.get_submodule(g.linears[0]).in_features, dtype=torch.float64, device=device)
             for g in groups}

    def add(gname: str, x: torch.Tensor) -> None:
        add_gram(grams[gname], x)
    return grams, add


def block_forward(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The block's output, or None when an input hook stopped it early."""
    try:
        return _block_output(layer(x, **kwargs))
    except _Stop:
        return None


def cosine_sum(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x, y, dim=-1).double().sum().item()


def check_finite_grams(grams: dict[str, torch.Tensor], spec: ArchSpec, index: int) -> None:
    for group in spec.groups:
        if group.name in grams and not torch.isfinite(grams[group.name]).all():
            name = f"{spec.layers_path}.{index}.{group.linears[0]}"
            raise SwiftSVDError(f"NaN or Inf in the activations at the input of {name}")


@torch.no_grad()
def calibrate(model: nn.Module, spec: ArchSpec, ids: torch.Tensor, batch_size: int = 8,
              on_block: Callable[[nn.Module, BlockStats], None] | None = None,
              sequential: bool = False, progress: bool = True, cross: bool = False,
              device: torch.device | str = "cpu") -> list[BlockStats]:
    """Accumulate per-block input covariances over ``ids`` (n, seqlen).

    ``on_block(layer, stats)`` is called once block i's statistics are complete (it may
    replace the block's linears). With ``sequential``, block i+1 then sees the outputs of the
    modified block i; otherwise it sees the dense outputs computed during the pass.

    ``cross`` (sequential only, for the least-squares refit of B) also carries the dense model's
    hidden states alongside and goes through each block one input group at a time, in forward
    order (q/k/v, o, gate/up, down): ``on_block`` gets that group's statistics alone, with the
    cross-covariance X_cᵀ·X_d between the compressed-path input X_c and the dense input X_d in
    ``stats.extra["cross"]``, and X_c is measured through the groups already replaced. Without
    that, o_proj would be refit on the inputs of the dense attention and then fed by refit
    q/k/v that already correct toward the dense model: the correction counted twice (SmolLM2 at
    ratio 0.2, 2026-11-30: held-out ppl 1367 that way, 144 group by group, 104 without the refit).

    Returns every block's statistics; with ``on_block`` (which consumed them) only the summary
    stays (index, token count, importance, time), so the Grams of one block at a time are held.

    ``device`` runs each block (moved there for its turn), the hidden states and the Gram
    accumulators there; ``on_block`` gets the block and statistics back in host memory. Under
    torch.distributed each rank calibrates its shard of ``ids`` and the sums are all-reduced
    (see ``distributed``).
    """
    distributed.begin_pass(sequential, cross)
    ids = distributed.shard(ids)
    model.eval()
    hidden, kwargs = capture_block_inputs(model, spec, ids, batch_size)
    hidden, kwargs = hidden.to(device), _kwargs_to(kwargs, device)
    if not torch.isfinite(hidden).all():
        raise SwiftSVDError("NaN or Inf in the activations entering block 0 (embeddings)")
    outs = torch.empty_like(hidden)
    cross = cross and sequential
    dense = (hidden.clone(), torch.empty_like(hidden)) if cross else None
    layers = spec.layers(model)
    results: list[BlockStats] = []
    for i, layer in enumerate(tqdm(layers, desc="calibrating blocks", disable=not progress, unit="block")):
        home = next(layer.parameters()).device
        layer.to(device)
        if cross:
            stats = _refit_block(layer, spec, i, hidden, outs, dense, kwargs_for(layer, kwargs), batch_size,
                                 on_block, home)
        else:
            stats = _block(layer, spec, i, hidden, outs, kwargs_for(layer, kwargs), batch_size, on_block, home,
                           sequential)
        if not torch.isfinite(outs).all():
            raise SwiftSVDError(f"NaN or Inf in the activations leaving block {i}")
        if on_block is not None:
            stats.grams.clear()
            stats.extra.clear()
        results.append(stats)
        hidden, outs = outs, hidden
        if cross:
            dense = dense[::-1]
    return results


def _block(layer, spec, i, hidden, outs, layer_kwargs, batch_size, on_block, home, sequential) -> BlockStats:
    """One pass of block i: every group's Gram, the outputs, the importance; then ``on_block``."""
    t0 = time.perf_counter()
    grams, add = gram_accumulators(layer, spec.groups, hidden.device)
    cos_sum = 0.0
    with input_hooks(layer, spec.groups, add):
        for start in range(0, hidden.shape[0], batch_size):
            x = hidden[start:start + batch_size]
            outs[start:start + batch_size] = y = block_forward(layer, x, layer_kwargs)
            cos_sum += cosine_sum(x, y)
    n_tokens = hidden.shape[0] * hidden.shape[1]
    cos_sum, n_tokens = distributed.reduce_block(i, [mirror_gram(g) for g in grams.values()], cos_sum, n_tokens)
    check_finite_grams(grams, spec, i)
    stats = BlockStats(i, to_device(grams, home), n_tokens, 1.0 - cos_sum / n_tokens, time.perf_counter() - t0)
    layer.to(home)
    if on_block is not None:
        on_block(layer, stats)
        if sequential:
            layer.to(hidden.device)
            distributed.sync_block(layer)
            run_block(layer, hidden, layer_kwargs, batch_size, out=outs)
            layer.to(home)
    return stats


def _refit_block(layer, spec, i, hidden, outs, dense, layer_kwargs, batch_size, on_block, home) -> BlockStats:
    """Block i group by group for the refit (see ``calibrate``): per group, X_cᵀX_c on the
    compressed stream through the groups replaced so far and X_cᵀX_d against a dense copy of the
    block on the dense stream; the first group's pass also gives the importance and the dense
    stream's outputs."""
    t0 = time.perf_counter()
    dense_hidden, dense_outs = dense
    dense_layer = copy.deepcopy(layer)
    merged = BlockStats(i, {}, 0, 0.0, extra={"cross": {}})
    for gi, group in enumerate(spec.groups):
        d = layer.get_submodule(group.linears[0]).in_features
        gram = torch.zeros(d, d, dtype=torch.float64, device=hidden.device)
        crossed = torch.zeros_like(gram)
        pending: list[torch.Tensor] = []

        def add_compressed(_g, x, gram=gram, pending=pending):
            add_gram(gram, x)
            pending.append(x)

        def add_dense(_g, x, crossed=crossed, pending=pending):
            crossed.add_((pending.pop().T @ x).double())

        full = gi == 0  # the whole block runs once: outputs of the dense stream, importance
        cos_sum = 0.0
        with input_hooks(layer, [group], add_compressed, stop=not full), \
                input_hooks(dense_layer, [group], add_dense, stop=not full):
            for start in range(0, hidden.shape[0], batch_size):
                x, xd = hidden[start:start + batch_size], dense_hidden[start:start + batch_size]
                y = block_forward(layer, x, layer_kwargs)
                yd = block_forward(dense_layer, xd, layer_kwargs)
                if full:
                    dense_outs[start:start + batch_size] = yd
                    cos_sum += cosine_sum(x, y)
        n_tokens = hidden.shape[0] * hidden.shape[1]
        cos_sum, n_tokens = distributed.reduce_block(i, [mirror_gram(gram), crossed], cos_sum, n_tokens)
        check_finite_grams({group.name: gram}, spec, i)
        if full:
            merged.n_tokens, merged.importance = n_tokens, 1.0 - cos_sum / n_tokens
        stats = BlockStats(i, {group.name: gram.to(home)}, n_tokens, merged.importance,
                           extra={"cross": {group.name: crossed.to(home)}})
        merged.grams.update(stats.grams)
        merged.extra["cross"].update(stats.extra["cross"])
        layer.to(home)
        if on_block is not None:
            on_block(layer, stats)
        layer.to(hidden.device)
        distributed.sync_block(layer)
    run_block(layer, hidden, layer_kwargs, batch_size, out=outs)
    layer.to(home)
    merged.seconds = time.perf_counter() - t0
    return merged
