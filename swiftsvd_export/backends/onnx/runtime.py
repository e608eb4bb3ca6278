"""The project's own generation loop on plain onnxruntime (no optimum, no torch).

The exported decoder takes ``input_ids``, ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key/value`` and returns ``logits`` and ``present.{i}.key/value``
(past_len + new tokens). The cache shapes are read from the graph: (batch, kv_heads, past_len,
head_dim) for a dense cache, (batch, 1, past_len, rank) for a latent one (the layout is in the
model metadata, ``swiftsvd.kv_cache``); a ``latent-kv`` graph also takes ``past_position_ids``,
the positions of the cached cells, to rotate the keys it rebuilds. Prefill passes an empty cache
(past_len = 0); each decode step feeds the previous ``present`` back as ``past`` as OrtValues,
so the cache is not copied through numpy between steps. A graph whose attention is onnxruntime's
GroupQueryAttention (metadata ``swiftsvd.attention`` = ``gqa``) gets one preallocated buffer per
cache entry instead, bound as both past and present (IO binding): the op appends the new tokens in
place, where the other graphs copy the whole cache into a new present at every step. The buffers
grow by doubling when a step would overrun them.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from ...errors import SwiftSVDError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
LAYOUT_KEY = "swiftsvd.kv_cache"  # model metadata written by latent_export (kept here: no torch import)
ATTENTION_KEY = "swiftsvd.attention"
_CHUNK = 256  # shared-buffer capacities are multiples of this many positions
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None = None, optimization: str = "all"):
    """The onnxruntime session options every run of the project uses."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # int8-dynamic graphs (MatMulInteger, u8 x s8): on x64 CPUs without VNNI onnxruntime's default
    # kernel adds products in pairs in 16 bits (vpmaddubsw) and saturates on full-range weights;
    # this selects the exact kernel (README, "int8-dynamic"). Ours keep their weights in [-64, 64]
    # and need it no more; graphs quantized elsewhere, or by older exports, still do.
    so.add_session_config_entry("session.x64quantprecision", "1")
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


class OrtDecoder:
    """A KV-cached decoder session; works for every precision/quantization the exporter writes."""

    def __init__(self, folder: str | Path, threads: int | None = None, model_file: str | None = None,
                 optimization: str = "all"):
        import onnxruntime as ort

        folder = Path(folder)
        if model_file is None:
            model_file = "model.onnx" if (folder / "model.onnx").is_file() else "model.ort"
        path = folder / model_file
        if not path.is_file():
            raise SwiftSVDError(f"{folder}: no model.onnx or model.ort (export it with "
                                "`swiftsvd-export export --target onnx`)")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, optimization),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            raise SwiftSVDError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        self.folder = folder
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted(((int(m.group(1)), m.group(2), n) for n in inputs if (m := _PAST.match(n))))
        if "input_ids" not in inputs or not past:
            raise SwiftSVDError(f"{path}: not a KV-cache decoder graph (inputs {sorted(inputs)[:5]})")
        self.num_layers = max(layer for layer, _, _ in past) + 1
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ["logits"] + self.present_names if n not in outputs]
        if missing:
            raise SwiftSVDError(f"{path}: graph lacks outputs {missing[:3]}")
        self.output_names = ["logits"] + self.present_names
        meta = self.session.get_modelmeta().custom_metadata_map
        self.layout = meta.get(LAYOUT_KEY, "dense")
        self.shared_buffers = meta.get(ATTENTION_KEY) == "gqa"
        cfg = self._config()
        # (heads, width) of each cache entry, from the graph; symbolic dims (optimum) from the config
        dense = (cfg.get("num_key_value_heads", cfg.get("num_attention_heads")),
                 cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(cfg.get("num_attention_heads", 1), 1))
        self.cache_shapes = []
        for name in self.past_names:
            shape = inputs[name].shape
            self.cache_shapes.append(tuple(int(shape[d]) if isinstance(shape[d], int) else int(dense[j])
                                           for j, d in enumerate((1, 3))))
        self.kv_dtype = _ORT_TYPES.get(inputs[self.past_names[0]].type, np.float32)
        self.has_position_ids = "position_ids" in inputs
        self.has_attention_mask = "attention_mask" in inputs
        self.has_past_positions = "past_position_ids" in inputs
        eos = cfg.get("eos_token_id")
        gen = folder / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def _config(self) -> dict:
        p = self.folder / "config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def empty_cache(self, batch: int = 1) -> list:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, 0, w), dtype=self.kv_dtype))
                for h, w in self.cache_shapes]

    def bytes_per_token(self) -> int:
        """KV cache bytes one token adds, from the graph's cache shapes."""
        return np.dtype(self.kv_dtype).itemsize * sum(h * w for h, w in self.cache_shapes)

    def step(self, ids: np.ndarray, cache, past_len: int) -> tuple[np.ndarray, object]:
        """Run ``ids`` (batch, T) after ``past_len`` cached tokens; returns (logits (batch, T, V), new cache).

        With shared buffers the cache is updated in place: positions from ``past_len`` on are
        overwritten, so a cache may be resumed from any earlier ``past_len`` but not forked."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b, t = ids.shape
        feed = self._inputs(ids, past_len)
        if self.shared_buffers:
            cache = SharedCache.fit(cache, self, b, past_len, past_len + t)
            io = self.session.io_binding()
            for name, value in feed.items():
                io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")
            for past, present, value in zip(self.past_names, self.present_names, cache.values):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            self.session.run_with_iobinding(io)
            return io.get_outputs()[0].numpy(), cache
        if cache is None:
            cache = self.empty_cache(b)
        feed.update(zip(self.past_names, cache))
        out = self.session.run_with_ort_values(self.output_names, feed)
        return out[0].numpy(), list(out[1:])

    def _inputs(self, ids: np.ndarray, past_len: int) -> dict:
        """input_ids, attention_mask, position_ids (and past_position_ids) as OrtValues."""
        import onnxruntime as ort

        b, t = ids.shape
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids)}
        if self.has_attention_mask:
            feed["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(np.ones((b, past_len + t), np.int64))
        if self.has_position_ids:
            pos = np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy()
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(pos)
        if self.has_past_positions:
            past_pos = np.broadcast_to(np.arange(past_len, dtype=np.int64), (b, past_len)).copy()
            feed["past_position_ids"] = ort.OrtValue.ortvalue_from_numpy(past_pos)
        return feed

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full-recompute logits (batch, T, V) from an empty cache."""
        return self.step(ids, None, 0)[0]

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, on_token=None) -> dict:
        rng = np.random.default_rng(seed)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        t0 = time.perf_counter()
        logits, cache = self.step(ids, None, 0)
        t_prefill = time.perf_counter() - t0
        past = ids.shape[1]
        out: list[int] = []
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            tok = sample(logits[0, -1], temperature, top_p, rng)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if (stop_at_eos and tok in self.eos_ids) or i == max_new_tokens - 1:
                break
            logits, cache = self.step(np.asarray([[tok]], np.int64), cache, past)
            past += 1
        t_decode = time.perf_counter() - t1
        steps = max(len(out) - 1, 0)  # the first token comes from the prefill logits
        return {"tokens": out, "prompt_tokens": len(prompt_ids), "prefill_s": t_prefill,
                "decode_s": t_decode, "decode_steps": steps,
                "prefill_tok_s": len(prompt_ids) / t_prefill if t_prefill > 0 else float("inf"),
                "decode_tok_s": steps / t_decode if t_decode > 0 and steps else float("nan")}


class SharedCache:
    """One buffer (batch, heads, capacity, width) per cache entry, bound as both past and present
    of a GroupQueryAttention graph: the op writes the new tokens after ``past_len`` in place."""

    def __init__(self, arrays: list[np.ndarray]):
        import onnxruntime as ort

        self.arrays = arrays  # the OrtValues below share these arrays' memory
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.capacity = arrays[0].shape[2]

    @classmethod
    def fit(cls, cache: "SharedCache | None", dec: OrtDecoder, batch: int, past_len: int, need: int) -> "SharedCache":
        """``cache`` if it holds ``need`` positions, else a larger copy of its first ``past_len``."""
        if cache is not None and cache.arrays[0].shape[0] != batch:
            raise SwiftSVDError(f"the cache holds batch {cache.arrays[0].shape[0]}, this step has {batch}")
        if cache is not None and need <= cache.capacity:
            return cache
        capacity = max(2 * cache.capacity if cache is not None else 0, -(-need // _CHUNK) * _CHUNK)
        arrays = [np.zeros((batch, h, capacity, w), dtype=dec.kv_dtype) for h, w in dec.cache_shapes]
        if cache is not None:
            for new, old in zip(arrays, cache.arrays):
                new[:, :, :past_len] = old[:, :, :past_len]
        return cls(arrays)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature <= 0; otherwise temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def load_tokenizer(folder: Path):
    """The tokenizer beside the graph: ``tokenizers`` alone (no torch needed), else transformers."""
    tok_json = Path(folder) / "tokenizer.json"
    if not tok_json.is_file():
        raise SwiftSVDError(f"{folder}: no tokenizer.json beside the graph")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_json))


def encode(tokenizer, folder: Path, text: str) -> list[int]:
    ids = tokenizer.encode(text).ids
    cfg_path = Path(folder) / "tokenizer_config.json"
    if cfg_path.is_file():
        tcfg = json.loads(cfg_path.read_text())
        bos = tcfg.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        if tcfg.get("add_bos_token") and bos is not None:
            bos_id = tokenizer.token_to_id(bos)
            if bos_id is not None and (not ids or ids[0] != bos_id):
                ids = [bos_id] + ids
    return ids


def generate_cli(args) -> int:
    folder = Path(args.artifact)
    if not folder.is_dir():
        raise SwiftSVDError(f"{folder}: not an ONNX export folder (give the folder written by "
                            "`swiftsvd-export export --target onnx`)")
    if args.max_new_tokens < 1:
        raise SwiftSVDError("--max-new-tokens must be >= 1")
    if not 0 < args.top_p <= 1:
        raise SwiftSVDError("--top-p must be in (0, 1]")
    dec = OrtDecoder(folder, threads=args.threads)
    tok = load_tokenizer(folder)
    prompt_ids = encode(tok, folder, args.prompt)
    if not prompt_ids:
        raise SwiftSVDError("the prompt encodes to no tokens")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    state = {"ids": [], "text": ""}

    def on_token(t: int) -> None:  # stream the decoded difference
        state["ids"].append(t)
        text = tok.decode(state["ids"], skip_special_tokens=True)
        sys.stdout.write(text[len(state["text"]):])
        sys.stdout.flush()
        state["text"] = text

    r = dec.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                     on_token=on_token)
    sys.stdout.write("\n")
    mode = "greedy" if args.temperature <= 0 else f"sampled T={args.temperature} top-p={args.top_p} seed={args.seed}"
    cache = f"kv-cache {dec.layout}" + (", appended in place (GroupQueryAttention)" if dec.shared_buffers else "")
    print(f"[onnxruntime {mode}, {cache}] prompt {r['prompt_tokens']} tok, "
          f"prefill {r['prefill_tok_s']:.1f} tok/s; generated {len(r['tokens'])} tok, decode {r['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return 0
