"""Write a compressed (or dense) llama model folder as GGUF with low-rank tensor pairs.

Spec (targets/llamacpp/README.md): a factorized linear of block N is stored as
``blk.N.<name>_lr_b.weight`` (B, out x k) instead of ``blk.N.<name>.weight``, with its A (k x in) in
``blk.N.<name>_lr_a.weight``, or, for linears that share their input (q/k/v, gate/up), stacked with the
others' A's in ``blk.N.attn_qkv_lr_a.weight`` / ``blk.N.ffn_gate_up_lr_a.weight`` (one matmul for the
group); the file carries ``swiftsvd.lowrank.version = 2`` (uint32). A latent KV cache
(``kv_cache``) adds ``swiftsvd.kv_cache.layout``: one uint32 per layer, bit 0 = cache A_V·x, bit 1 = A_K·x.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np

from ...atomic import atomic_file, check_output
from ...errors import SwiftSVDError
from ...latent_kv import check_layout, default_layout
from ...lowrank import FORMAT_VERSION, read_config
from ...channel_importance import LATENT, Importance
from .ggml_quantize import GGMLQuantizer

log = logging.getLogger(__name__)

LOWRANK_KEY = "swiftsvd.lowrank.version"
LOWRANK_VERSION = 2
LOWRANK_RANKS_KEY = "swiftsvd.lowrank.ranks"  # informative only; llama.cpp reads ranks from shapes
KV_LAYOUT_KEY = "swiftsvd.kv_cache.layout"
# --kv-cache value -> per-layer layout bits of KV_LAYOUT_KEY (1: V latent, 2: K latent)
KV_LAYOUTS = {"dense": 0, "latent-v": 1, "latent-kv": 3}

# HF linear (relative to model.layers.N) -> GGUF base name
LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# linears that read the same input: their A's are stacked (rows in this order) into one tensor
STACKED_A = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
QUANT_BLOCK = 32


def _qtypes():
    import gguf
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def _file_type(name: str) -> int:
    import gguf
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[name]


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K RoPE row permutation (convert_hf_to_gguf LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass
class ExportSummary:
    path: Path
    n_tensors: int = 0
    n_lowrank: int = 0
    n_dense: int = 0
    fallbacks: list[str] = field(default_factory=list)
    size_bytes: int = 0
    kv_cache: str = "dense"
    n_weighted: int = 0
    importance: str = ""

    def lines(self) -> list[str]:
        out = [f"wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.n_tensors} tensors: "
               f"{self.n_lowrank} low-rank pairs, {self.n_dense} dense block matrices; "
               f"KV cache {self.kv_cache})"]
        if self.fallbacks:
            out.append(f"{len(self.fallbacks)} tensors stored as F16 because their rows do not fit "
                       f"the {QUANT_BLOCK}-wide quantization block: " + ", ".join(self.fallbacks[:6])
                       + (" ..." if len(self.fallbacks) > 6 else ""))
        if self.n_weighted:
            out.append(f"{self.n_weighted} Q4_0 tensors quantized with importance weights ({self.importance})")
        return out


class _Weights:
    """Lazy fp32 access to model.safetensors."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        path = folder / "model.safetensors"
        if not path.is_file():
            raise SwiftSVDError(f"{folder}: no model.safetensors")
        self._f = safe_open(str(path), framework="pt")
        self.keys = set(self._f.keys())
        self.path = path

    def get(self, name: str) -> np.ndarray:
        if name not in self.keys:
            raise SwiftSVDError(f"{self.path}: tensor {name} missing")
        return self._f.get_tensor(name).float().numpy()


def _hf_tokenizer_metadata(folder: Path, writer, vocab_size: int) -> None:
    """Tokenizer and chat template the way convert_hf_to_gguf does it for gpt2-style BPE."""
    import gguf
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any tokenizer problem is a user input problem
        raise SwiftSVDError(f"{folder}: cannot load the tokenizer ({e})") from None
    tj = folder / "tokenizer.json"
    model_type = json.loads(tj.read_text()).get("model", {}).get("type") if tj.is_file() else None
    if model_type != "BPE" or not getattr(tok, "is_fast", False):
        raise SwiftSVDError(f"{folder}: only byte-level BPE tokenizers (tokenizer.json) are supported "
                            f"for GGUF export (found {model_type or 'none'})")
    table = json.loads((Path(__file__).with_name("tokenizer_pre.json")).read_text(encoding="utf-8"))
    chkhsh = sha256(str(tok.encode(table["chktxt"])).encode()).hexdigest()
    pre = table["chkhsh"].get(chkhsh)
    if pre is None:
        log.warning("unknown pre-tokenizer (hash %s); writing 'default'", chkhsh[:12])
        pre = "default"
    vocab = tok.vocab
    if max(vocab.values()) >= vocab_size:
        raise SwiftSVDError(f"{folder}: tokenizer has ids beyond the model's vocab_size {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not decoder[i].normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            if decoder[i].special or (t.startswith("<|") and t.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(folder), load_merges=True)
    special.add_to_gguf(writer)
    if "bos" not in special.add_special_token:
        cfg = folder / "tokenizer_config.json"
        add_bos = bool(json.loads(cfg.read_text()).get("add_bos_token", False)) if cfg.is_file() else False
        writer.add_add_bos_token(add_bos)
    if special.chat_template is None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            writer.add_chat_template(jinja.read_text())


def check_kv_cache(kv_cache: str, cfg: dict, ranks: dict[str, int], where: str) -> int:
    """The layout bits for ``kv_cache``; a latent cache needs every layer's projection factorized
    (its A·x is what is cached), so anything else is refused rather than silently run dense."""
    if kv_cache not in KV_LAYOUTS:
        raise SwiftSVDError(f"unknown --kv-cache {kv_cache!r}; choose one of {', '.join(KV_LAYOUTS)}")
    try:
        check_layout(kv_cache, cfg, ranks)
    except SwiftSVDError as e:
        raise SwiftSVDError(f"{where}: {e}") from None
    return KV_LAYOUTS[kv_cache]


@contextmanager
def _gguf_py_logs(level: int | None):
    """gguf-py logs each special token and the whole chat template at INFO: ``quiet`` keeps them out."""
    log_ = logging.getLogger("gguf")
    old = log_.level
    if level is not None:
        log_.setLevel(level)
    try:
        yield
    finally:
        log_.setLevel(old)


def export_gguf(model_dir: str | Path, output: str | Path, factor_type: str = "f16",
                embed_type: str = "f16", overwrite: bool = False, quiet: bool = False,
                kv_cache: str | None = None, a_type: str | None = None,
                imatrix_calib: str | Path | None = None, imatrix_samples: int = 16, text_field: str = "text",
                importance: Importance | None = None) -> ExportSummary:
    """Write the GGUF; ``kv_cache`` None picks ``latent_kv.default_layout``; ``a_type`` (default
    ``factor_type``) is the type of the A factors, ``factor_type`` that of B and of dense block
    weights (A is the more sensitive factor: README, "Q4_0 factors").
    ``imatrix_calib`` (as in ``export_onnx``): with Q4_0 factors or A, a calibration text whose E[x²]
    per input channel weights ggml's rounding of every Q4_0 block weight, measured once the inputs are
    checked; ``importance`` passes one already measured (``channel_importance.measure``) instead."""
    import gguf

    folder = Path(model_dir)
    cfg = read_config(folder)
    if cfg.get("model_type") != "llama":
        raise SwiftSVDError(f"{folder}: GGUF export supports model_type 'llama' only (found "
                            f"{cfg.get('model_type')!r}): the llama.cpp patch runs low-rank pairs in the llama "
                            "graph only; targets/llamacpp/README.md ('Other architectures') says what "
                            "Gemma 3 and the others need; use --target onnx for this model")
    qtypes = _qtypes()
    a_type = a_type or factor_type
    for what, t in (("factor type", factor_type), ("A factor type", a_type), ("embedding type", embed_type)):
        if t not in qtypes:
            raise SwiftSVDError(f"unknown {what} {t!r}; choose one of {', '.join(qtypes)}")
    meta = cfg.get("swiftsvd", {"format_version": FORMAT_VERSION, "ranks": {}})
    if meta.get("format_version") != FORMAT_VERSION:
        raise SwiftSVDError(f"{folder}: unsupported swiftsvd format version {meta.get('format_version')!r}")
    ranks: dict[str, int] = {k: int(v) for k, v in meta.get("ranks", {}).items()}
    if cfg.get("rope_scaling"):
        raise SwiftSVDError(f"{folder}: rope_scaling {cfg['rope_scaling']!r} is not supported by the GGUF target yet")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise SwiftSVDError(f"{folder}: linear biases are not supported by the GGUF target")

    n_layer = int(cfg["num_hidden_layers"])
    n_embd = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    vocab_size = int(cfg["vocab_size"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    unknown = [n for n in ranks if not n.startswith("model.layers.")
               or n.split(".", 3)[3] not in LINEARS]
    if unknown:
        raise SwiftSVDError(f"{folder}: low-rank modules the GGUF target cannot place: {unknown[:3]}")
    kv_cache = kv_cache or default_layout(ranks, n_layer)
    kv_bits = check_kv_cache(kv_cache, cfg, ranks, str(folder))

    w = _Weights(folder)
    summary = ExportSummary(path=Path(output), kv_cache=kv_cache)
    fallbacks = summary.fallbacks
    factor_q, a_q, embed_q = qtypes[factor_type], qtypes[a_type], qtypes[embed_type]
    F16 = qtypes["f16"]
    quantizer = None
    if (importance is not None or imatrix_calib is not None) and qtypes["q4_0"] in (factor_q, a_q):
        check_output(Path(output), overwrite)  # before the importance pass, not after it
        quantizer = GGMLQuantizer.from_build()
        if importance is None:
            from ...channel_importance import measure

            importance = measure(folder, imatrix_calib, imatrix_samples, 512, text_field=text_field)

    output = Path(output)
    with atomic_file(output, overwrite) as tmp, _gguf_py_logs(logging.WARNING if quiet else None):
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or folder.name)
        writer.add_block_count(n_layer)
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != n_embd // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_file_type(_file_type(factor_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if ranks:
            writer.add_uint32(LOWRANK_KEY, LOWRANK_VERSION)
        if kv_bits:
            writer.add_key_value(KV_LAYOUT_KEY, [kv_bits] * n_layer, gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.UINT32)
        _hf_tokenizer_metadata(folder, writer, vocab_size)
        if quantizer is not None:  # the keys llama-quantize writes for an imatrix
            writer.add_string("quantize.imatrix.dataset", importance.dataset)
            writer.add_int32("quantize.imatrix.entries_count", len(importance.vectors))
            writer.add_int32("quantize.imatrix.chunks_count", importance.chunks)

        def add(name: str, arr: np.ndarray, qtype, weights=None) -> None:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if qtype in (qtypes["q8_0"], qtypes["q4_0"]) and arr.shape[-1] % QUANT_BLOCK:
                fallbacks.append(f"{name} {tuple(arr.shape)}")
                qtype = F16
            if qtype == qtypes["f32"]:
                writer.add_tensor(name, arr)
            elif qtype == F16:
                writer.add_tensor(name, arr.astype(np.float16))
            elif qtype == qtypes["q4_0"] and quantizer is not None and weights is not None:
                writer.add_tensor(name, quantizer.quantize(arr, qtype, weights()), raw_dtype=qtype)
                summary.n_weighted += 1
            else:
                writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
            summary.n_tensors += 1

        add("token_embd.weight", w.get("model.embed_tokens.weight"), embed_q)
        add("output_norm.weight", w.get("model.norm.weight"), qtypes["f32"])
        if not tied and "lm_head.weight" in w.keys:
            add("output.weight", w.get("lm_head.weight"), embed_q)
        for i in range(n_layer):
            pre = f"model.layers.{i}"
            for hf, gg in NORMS.items():
                add(f"blk.{i}.{gg}.weight", w.get(f"{pre}.{hf}.weight"), qtypes["f32"])
            a_of: dict[str, np.ndarray] = {}
            input_of: dict[str, str] = {}  # GGUF base name -> module whose input its A reads
            for hf, gg in LINEARS.items():
                heads = n_head if gg == "attn_q" else n_head_kv if gg == "attn_k" else None
                module = f"{pre}.{hf}"
                if module in ranks:
                    a, b = w.get(f"{module}.A.weight"), w.get(f"{module}.B.weight")
                    if a.shape[0] != ranks[module] or b.shape[1] != a.shape[0]:
                        raise SwiftSVDError(f"{folder}: {module} factors A {a.shape} / B {b.shape} do not "
                                            f"match rank {ranks[module]}")
                    if heads:
                        b = permute_rows(b, heads)
                    a_of[gg], input_of[gg] = a, module
                    add(f"blk.{i}.{gg}_lr_b.weight", b, factor_q,
                        lambda m=module: importance.for_linear(m, LATENT))
                    summary.n_lowrank += 1
                else:
                    d = w.get(f"{module}.weight")
                    if heads:
                        d = permute_rows(d, heads)
                    add(f"blk.{i}.{gg}.weight", d, factor_q, lambda m=module: importance.for_linear(m))
                    summary.n_dense += 1
            for group, members in STACKED_A.items():
                present = [m for m in members if m in a_of]
                if present:
                    add(f"blk.{i}.{group}_lr_a.weight", np.concatenate([a_of.pop(m) for m in present]), a_q,
                        lambda m=input_of[present[0]]: importance.for_linear(m))
            for gg, a in a_of.items():
                add(f"blk.{i}.{gg}_lr_a.weight", a, a_q, lambda m=input_of[gg]: importance.for_linear(m))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    summary.size_bytes = output.stat().st_size
    if summary.n_weighted:
        summary.importance = importance.describe()
    if not quiet:
        for line in summary.lines():
            print(line)
    return summary
