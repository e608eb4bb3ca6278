"""Compressed (latent) KV cache for a low-rank Llama: the torch reference and parity oracle.

With k_proj = B_K·A_K and v_proj = B_V·A_V factorized, the rank-k latents A_K·x and A_V·x
carry everything K and V hold, so a cache of latents is (k_K + k_V)/(2·d_kv) of a dense one.
Layouts (per layer; batch and sequence axes omitted):

- ``dense``: key (kv_heads, head_dim) after RoPE, value (kv_heads, head_dim) — the usual cache;
- ``latent-v``: key as dense, value = A_V·x (1, k_V), shared by all heads. Attention computes
  softmax(QKᵀ)·latent, then B_V per head (B_V as (kv_heads, head_dim, k_V); each query head uses
  its kv group's slice), like llama.cpp deepseek2's ``v_mla``. By associativity this equals
  softmax(QKᵀ)·V; a bias b_V passes through unchanged because softmax rows sum to 1;
- ``latent-kv``: also key = A_K·x (1, k_K). Every step reconstructs K = B_K·latent for all cached
  positions and applies RoPE at each cell's position (RoPE depends on the key position, so B_K
  cannot be folded into the query). The positions of the cached cells are an input.

``LatentLlama`` runs a transformers Llama with LowRankLinear modules (``lowrank.load``) under
one of these layouts, sharing its weights; ``torch.onnx.export`` traces the same module, so the
ONNX graph and this reference are one piece of code.

Attention (``ATTENTIONS``): ``plain`` exports the products, the softmax and the cache append as ONNX
ops; ``gqa`` (dense layout only) exports each layer's attention as one onnxruntime
``GroupQueryAttention`` (com.microsoft) node, whose cache can be one preallocated buffer that the
op appends to in place (``backends.onnx.runtime``): the plain graph's Concat copies the whole cache
at every step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .architectures import REGISTRY, spec_for
from .errors import SwiftSVDError
from .lowrank import LowRankLinear

LAYOUTS = ("dense", "latent-v", "latent-kv")
ATTENTIONS = ("plain", "gqa")
_NEEDS = {"dense": (), "latent-v": ("v_proj",), "latent-kv": ("k_proj", "v_proj")}


def _cfg(config, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def head_dim(config) -> int:
    return int(_cfg(config, "head_dim") or _cfg(config, "hidden_size") // _cfg(config, "num_attention_heads"))


def check_layout(layout: str, config, ranks: dict[str, int]) -> None:
    """Refuse a latent layout unless the projections it caches are factorized in every layer.

    ``config`` is a transformers config or its dict; module names are Llama's (latent layouts exist
    for the registry entries with ``latent_kv`` only)."""
    if layout not in LAYOUTS:
        raise SwiftSVDError(f"unknown KV cache layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    model_type = _cfg(config, "model_type")
    if layout != "dense" and not getattr(REGISTRY.get(model_type), "latent_kv", False):
        supported = ", ".join(sorted(t for t, s in REGISTRY.items() if s.latent_kv))
        raise SwiftSVDError(f"KV cache layout {layout!r} is not available for model_type {model_type!r} "
                            f"(supported: {supported}); use the dense cache")
    needs = _NEEDS[layout]
    missing = [f"model.layers.{i}.self_attn.{p}" for i in range(int(_cfg(config, "num_hidden_layers")))
               for p in needs if f"model.layers.{i}.self_attn.{p}" not in ranks]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SwiftSVDError(f"KV cache layout {layout!r} needs {' and '.join(needs)} factorized in every layer; "
                            f"not factorized: {missing[0]}{more}")


def default_layout(ranks: dict[str, int], n_layer: int, model_type: str = "llama") -> str:
    """The cache a compressed model ships with: ``latent-v`` when every layer's v_proj is factorized
    (a smaller cache at no decode cost) and the architecture has latent layouts, else ``dense``."""
    if not getattr(REGISTRY.get(model_type), "latent_kv", False):
        return "dense"
    return "latent-v" if all(f"model.layers.{i}.self_attn.v_proj" in ranks for i in range(n_layer)) else "dense"


def cache_shapes(config, ranks: dict[str, int], layout: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, the (key, value) cache shapes without the batch and sequence axes: (heads, width)."""
    check_layout(layout, config, ranks)
    dense = (int(_cfg(config, "num_key_value_heads") or _cfg(config, "num_attention_heads")), head_dim(config))
    out = []
    for i in range(int(_cfg(config, "num_hidden_layers"))):
        attn = f"model.layers.{i}.self_attn"
        key = (1, ranks[f"{attn}.k_proj"]) if layout == "latent-kv" else dense
        value = (1, ranks[f"{attn}.v_proj"]) if layout != "dense" else dense
        out.append((key, value))
    return out


def kv_bytes_per_token(config, ranks: dict[str, int], layout: str, itemsize: int = 4) -> int:
    """KV cache bytes one token adds, summed over layers, computed from the shapes."""
    return itemsize * sum(k[0] * k[1] + v[0] * v[1] for k, v in cache_shapes(config, ranks, layout))


def model_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


class _Reshape(torch.autograd.Function):
    """``x.reshape(shape)`` where 0 keeps x's size at that index, as ONNX's Reshape reads it.

    Traced, ``view(b, t, heads, head_dim)`` with sizes read from the tensor becomes a chain of
    Shape, Gather, Unsqueeze and Concat kernels per call; this exports as one Reshape with a
    constant shape. Those chains were ~25 of a layer's ~66 kernels, a fixed cost per decoded
    token that dense and low-rank graphs pay alike (tools/bench_onnx.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """``x.reshape`` with 0 = keep that size; exactly one -1 (the exporter's shape inference needs it)."""
    return _Reshape.apply(x, shape)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R with x·R = rotate_half(x) = cat(−x₂, x₁): one MatMul by a constant (exact: ±1 and 0s)
    instead of two Slices, a Neg and a Concat in the graph."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[half:, :half] = -torch.eye(half)
    r[:half, half:] = torch.eye(half)
    return r


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' Llama applies it: x·cos + rotate_half(x)·sin (cos/sin: batch, 1, seq, head_dim)."""
    return x * cos + (x @ rot) * sin


class HeadwiseB(nn.Module):
    """B_V applied per query head to softmax(QKᵀ)·latent: (b, heads, t, k) -> (b, heads, t, head_dim).

    One batched MatMul with B_V viewed as (kv_heads, k, head_dim): the query heads of kv group g
    (consecutive, as in transformers' ``repeat_kv``) all use slice g.
    """

    def __init__(self, b: nn.Linear, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.weight, self.bias = b.weight, b.bias
        self.heads, self.kv_heads, self.head_dim, self.rank = heads, kv_heads, head_dim, b.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.kv_heads, self.head_dim, self.rank).transpose(1, 2)
        y = reshape(x, 0, self.kv_heads, -1, self.rank) @ w
        if self.bias is not None:
            y = y + self.bias.view(self.kv_heads, 1, self.head_dim)
        return reshape(y, 0, self.heads, -1, self.head_dim)


class LatentValue(nn.Module):
    """v_proj under a latent layout: caches A_V·x; B_V comes after attention, per head."""

    def __init__(self, v_proj: LowRankLinear, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.A, self.B = v_proj.A, HeadwiseB(v_proj.B, heads, kv_heads, head_dim)

    def forward(self, x: torch.Tensor, probs: torch.Tensor, past: torch.Tensor):
        """probs (b, heads, t, s), past (b, 1, s - t, k) -> (attention output per head, present latent)."""
        present = torch.cat([past, self.A(x).unsqueeze(1)], dim=2)
        return self.B(probs @ present), present


class LatentKey(nn.Module):
    """k_proj under ``latent-kv``: caches A_K·x, rebuilds K = B_K·latent at every key position.

    The caller rotates the keys, so this module's graph scope holds only the A and B MatMuls."""

    def __init__(self, k_proj: LowRankLinear, kv_heads: int, head_dim: int):
        super().__init__()
        self.A, self.B = k_proj.A, k_proj.B
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def forward(self, x: torch.Tensor, past: torch.Tensor):
        """past (b, 1, s - t, k) -> (keys before RoPE (b, kv_heads, s, head_dim), present latent)."""
        present = torch.cat([past, self.A(x).unsqueeze(1)], dim=2)
        k = reshape(self.B(present.squeeze(1)), 0, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, present


class _GroupQueryAttention(torch.autograd.Function):
    """Grouped-query attention over a cache, exported as one onnxruntime GroupQueryAttention node.

    q (b, t, heads·d), k and v (b, t, kv_heads·d) with RoPE applied; past_k/past_v (b, kv_heads, s, d);
    mask (b, 1, t, s + t), additive, also passed to the node as its ``attention_bias`` (padding);
    returns (out (b, t, heads·d), present_k, present_v). The node's causal rule and this mask
    agree; ``seqlens_k`` and ``total_sequence_length`` come from the mask's width, so new keys go
    right after the ``s`` past ones, wherever a shared buffer's capacity ends."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, mask, heads: int, kv_heads: int, scale: float):
        b, t, _ = q.shape
        d = past_k.shape[-1]
        present_k = torch.cat([past_k, k.view(b, t, kv_heads, d).transpose(1, 2)], dim=2)
        present_v = torch.cat([past_v, v.view(b, t, kv_heads, d).transpose(1, 2)], dim=2)
        qg = q.view(b, t, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, -1, d)
        scores = (qg @ present_k.transpose(2, 3) * scale).view(b, heads, t, -1) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs.view(b, kv_heads, -1, probs.shape[-1]) @ present_v).view(b, heads, t, d)
        return out.transpose(1, 2).reshape(b, t, heads * d), present_k, present_v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, mask, heads, kv_heads, scale):
        int32 = torch.onnx.TensorProtoDataType.INT32
        width = g.op("Gather", g.op("Shape", mask), g.op("Constant", value_t=torch.tensor(3)), axis_i=0)
        total = g.op("Cast", width, to_i=int32)  # scalar: past + new tokens
        batch = g.op("Slice", g.op("Shape", q), g.op("Constant", value_t=torch.tensor([0])),
                     g.op("Constant", value_t=torch.tensor([1])))
        seqlens = g.op("Expand", g.op("Sub", total, g.op("Constant", value_t=torch.tensor(1, dtype=torch.int32))),
                       batch)
        # the optional cos_cache, sin_cache, position_ids inputs before attention_bias are left empty
        # by ``backends.onnx.latent_export.fill_optional_inputs`` (TorchScript has no empty input)
        out, pk, pv = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_k, past_v, seqlens, total, mask,
                           num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, outputs=3)
        out.setType(q.type())
        pk.setType(past_k.type())
        pv.setType(past_v.type())
        return out, pk, pv


class LatentAttention(nn.Module):
    """Llama self-attention over a cache in one of ``LAYOUTS``; projections shared with the source model.

    The cached projections are wrapped (``LatentKey``, ``LatentValue``) under their own names, so
    an exported graph keeps their MatMuls under ``k_proj/A``, ``v_proj/B``, ... as the checks expect.
    """

    def __init__(self, attn: nn.Module, config, layout: str, attention: str = "plain"):
        super().__init__()
        self.layout, self.attention = layout, attention
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = head_dim(config), attn.scaling
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        self.k_proj = LatentKey(attn.k_proj, self.kv_heads, self.head_dim) if layout == "latent-kv" else attn.k_proj
        self.v_proj = attn.v_proj if layout == "dense" else LatentValue(attn.v_proj, self.heads, self.kv_heads, self.head_dim)

    def _heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        return reshape(y, 0, -1, n, self.head_dim).transpose(1, 2)

    def forward(self, x, rope_q, rope_k, mask, past_k, past_v):
        """rope_q: (cos, sin, R) at the new positions; rope_k: at every key position (latent-kv only).

        Reshapes keep batch and sequence sizes symbolic (``reshape``), so the traced graph has no
        shape arithmetic; the scaling sits right after QKᵀ so ORT fuses it into that MatMul.
        ``gqa``: rope_q's cos/sin are (b, t, 1, d), for q and k in (b, t, heads, d)."""
        if self.attention == "gqa":
            q = reshape(rotate(reshape(self.q_proj(x), 0, 0, -1, self.head_dim), *rope_q), 0, 0, -1)
            k = reshape(rotate(reshape(self.k_proj(x), 0, 0, -1, self.head_dim), *rope_q), 0, 0, -1)
            out, present_k, present_v = _GroupQueryAttention.apply(q, k, self.v_proj(x), past_k, past_v, mask,
                                                                   self.heads, self.kv_heads, float(self.scaling))
            return self.o_proj(out), present_k, present_v
        q = rotate(self._heads(self.q_proj(x), self.heads), *rope_q)
        if self.layout == "latent-kv":
            k, present_k = self.k_proj(x, past_k)
            k = rotate(k, *rope_k)
        else:
            present_k = torch.cat([past_k, rotate(self._heads(self.k_proj(x), self.kv_heads), *rope_q)], dim=2)
            k = present_k
        # query heads grouped by kv head: (b, kv_heads, heads/kv_heads * t, head_dim), no K/V copies
        qg = reshape(q, 0, self.kv_heads, -1, self.head_dim)
        scores = reshape((qg @ k.transpose(2, 3)) * self.scaling, 0, self.heads, -1, 0) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if self.layout == "dense":
            present_v = torch.cat([past_v, self._heads(self.v_proj(x), self.kv_heads)], dim=2)
            out = reshape(reshape(probs, 0, self.kv_heads, -1, 0) @ present_v, 0, self.heads, -1, self.head_dim)
        else:
            out, present_v = self.v_proj(x, probs, past_v)
        out = reshape(out.transpose(1, 2), 0, -1, self.heads * self.head_dim)
        return self.o_proj(out), present_k, present_v


class LatentLayer(nn.Module):
    def __init__(self, layer: nn.Module, config, layout: str, attention: str = "plain"):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.self_attn = LatentAttention(layer.self_attn, config, layout, attention)
        self.mlp = layer.mlp

    def forward(self, h, rope_q, rope_k, mask, past_k, past_v):
        a, pk, pv = self.self_attn(self.input_layernorm(h), rope_q, rope_k, mask, past_k, past_v)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), pk, pv


class LatentBackbone(nn.Module):
    def __init__(self, model: nn.Module, layout: str, attention: str = "plain"):
        super().__init__()
        inner = model.model
        self.embed_tokens, self.norm, self.rotary_emb = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.layers = nn.ModuleList(LatentLayer(layer, model.config, layout, attention) for layer in inner.layers)
        self.register_buffer("rot", rotate_half_matrix(head_dim(model.config)), persistent=False)
        self.head_axis = 2 if attention == "gqa" else 1  # (b, t, heads, d) for gqa, else (b, heads, t, d)

    def _rope(self, h: torch.Tensor, positions: torch.Tensor, head_axis: int = 1) -> tuple[torch.Tensor, ...]:
        """(cos, sin, R) for ``rotate``, computed once per step for all layers; cos/sin get a
        size-1 axis where the tensors they rotate have their heads."""
        cos, sin = self.rotary_emb(h, positions)
        return cos.unsqueeze(head_axis), sin.unsqueeze(head_axis), self.rot.to(h.dtype)

    def forward(self, input_ids, attention_mask, position_ids, key_positions, past):
        h = self.embed_tokens(input_ids)
        rope_q = self._rope(h, position_ids, self.head_axis)
        rope_k = self._rope(h, key_positions) if key_positions is not None else None
        mask = causal_mask(attention_mask, input_ids.shape[1], h.dtype)
        present = []
        for i, layer in enumerate(self.layers):
            h, pk, pv = layer(h, rope_q, rope_k, mask, past[2 * i], past[2 * i + 1])
            present += [pk, pv]
        return self.norm(h), present


class LatentLlama(nn.Module):
    """A Llama forward with an explicit cache in one of ``LAYOUTS`` (module names match the source's).

    ``forward(input_ids, attention_mask, position_ids, [past_position_ids,] *past)`` returns
    ``(logits, *present)``; ``past``/``present`` are per layer (key, value), shapes from
    ``cache_shapes`` with batch and sequence axes: (batch, heads, seq, width).
    ``past_position_ids`` (batch, past_len), the positions of the cached cells, is taken only
    by ``latent-kv``; ``attention_mask`` covers past and new tokens (batch, past_len + t).
    """

    def __init__(self, model: nn.Module, layout: str, attention: str = "plain"):
        super().__init__()
        if not spec_for(model.config).latent_kv:
            raise SwiftSVDError(f"the torch reference with an explicit KV cache models Llama attention only; "
                                f"model_type {model.config.model_type!r} is not supported")
        self.ranks = model_ranks(model)
        check_layout(layout, model.config, self.ranks)
        check_attention(attention, layout)
        self.layout, self.attention, self.config = layout, attention, model.config
        self.model = LatentBackbone(model, layout, attention)
        self.lm_head = model.lm_head
        self.shapes = cache_shapes(model.config, self.ranks, layout)

    def cache_names(self) -> list[str]:
        return [f"{i}.{kv}" for i in range(len(self.shapes)) for kv in ("key", "value")]

    def empty_cache(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        return [torch.zeros(batch, s[0], 0, s[1], dtype=dtype) for kv in self.shapes for s in kv]

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        if self.layout == "latent-kv":
            key_positions, past = torch.cat([rest[0], position_ids], dim=1), rest[1:]
        else:
            key_positions, past = None, rest
        h, present = self.model(input_ids, attention_mask, position_ids, key_positions, past)
        return (self.lm_head(h), *present)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: list[torch.Tensor] | None, past_len: int):
        """Run ``ids`` (batch, t) after ``past_len`` cached tokens; returns (logits, new cache)."""
        b, t = ids.shape
        cache = self.empty_cache(b) if cache is None else cache
        mask = torch.ones(b, past_len + t, dtype=torch.long)
        pos = torch.arange(past_len, past_len + t).expand(b, t)
        extra = [torch.arange(past_len).expand(b, past_len)] if self.layout == "latent-kv" else []
        logits, *present = self(ids, mask, pos, *extra, *cache)
        return logits, present


def check_attention(attention: str, layout: str) -> None:
    if attention not in ATTENTIONS:
        raise SwiftSVDError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    if attention == "gqa" and layout != "dense":
        raise SwiftSVDError(f"--attention gqa needs the dense KV cache (GroupQueryAttention caches K and V "
                            f"per head); this export asks for {layout}: add --kv-cache dense")


def causal_mask(attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (batch, 1, t, past_len + t): new token i sees keys up to past_len + i, not padding."""
    s = attention_mask.shape[1]
    q_index = torch.arange(t, device=attention_mask.device) + (s - t)
    k_index = torch.arange(s, device=attention_mask.device)
    allowed = (k_index[None, :] <= q_index[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def latent_logits(latent: LatentLlama, ids: list[int]) -> torch.Tensor:
    """Full-sequence logits (positions x vocab) of one sequence from an empty cache."""
    return latent.step(torch.tensor([ids]), None, 0)[0][0]


def latent_greedy(latent: LatentLlama, ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation of ``n_new`` tokens: prefill, then one token per step through the cache."""
    logits, cache = latent.step(torch.tensor([ids]), None, 0)
    out = [int(logits[0, -1].argmax())]
    while len(out) < n_new:
        logits, cache = latent.step(torch.tensor([[out[-1]]]), cache, len(ids) + len(out) - 1)
        out.append(int(logits[0, -1].argmax()))
    return out
