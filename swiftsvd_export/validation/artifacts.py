"""Find what each path on the command line is, and read the byte figures from its tensors.

Kinds: ``torch`` (a compressed or dense transformers folder), ``onnx`` (an export folder; every
``.onnx``/``.ort`` graph in it is its own artifact) and ``gguf`` (a file). A folder that is none
of these but holds some (a release folder) stands for the artifacts directly inside it. The figures come from
the stored tensor metadata (safetensors header, ONNX initializers, GGUF tensor info), never from
loading the model:

- weight bytes read per decoded token: every tensor the step touches (linears and factors, norms,
  the output head) except the embedding table, of which one row is read; a tied embedding is
  read in full once, as the head, plus that row;
- KV bytes per token: 2 (K and V) x layers x kv_heads x head_dim x the runtime's cache element
  (fp32 for torch and for fp32/quantized ORT graphs, the graph's past type otherwise, F16 for
  llama.cpp's default cache); an ONNX graph's figure is summed over its cache inputs, so a latent
  cache counts its rank-wide rows.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import SwiftSVDError

_GRAPH_SUFFIXES = (".onnx", ".ort")
_PASS_THROUGH = {"Cast", "DequantizeLinear", "Identity"}
_INT8_OPS = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
TORCH_ELEMENT_BYTES = 4  # torch artifacts run in fp32 on the CPU
LLAMACPP_KV_BYTES = 2  # llama.cpp's default F16 KV cache


@dataclass
class Artifact:
    """One runnable model file (or folder) and its static byte figures."""

    name: str
    kind: str
    path: Path  # folder (torch, onnx) or file (gguf)
    variant: str
    file_bytes: int
    weight_bytes_per_token: int
    kv_bytes_per_token: int
    model_file: str | None = None  # the graph file inside an ONNX folder


def discover(paths: list[str | Path]) -> list[Artifact]:
    """Every artifact under ``paths``; a missing or unrecognised path raises SwiftSVDError naming it."""
    found: list[Artifact] = []
    for p in map(Path, paths):
        if not p.exists():
            raise SwiftSVDError(f"{p}: no such artifact")
        found.extend(_detect(p))
    seen: Counter = Counter()
    for a in found:  # unique names, in order
        seen[a.name] += 1
        if seen[a.name] > 1:
            a.name = f"{a.name}#{seen[a.name]}"
    return found


def _detect(p: Path) -> list[Artifact]:
    if p.is_file() and p.suffix == ".gguf":
        return [gguf_artifact(p)]
    if p.is_dir():
        graphs = _graph_files(p)
        if graphs:
            return [onnx_artifact(p, g, len(graphs) > 1) for g in graphs]
        if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            return [torch_artifact(p)]
        inner = [a for c in sorted(p.iterdir()) if not c.name.startswith(".") and _is_artifact(c)
                 for a in _detect(c)]
        if inner:  # a folder of artifacts (a release): each one it holds
            return inner
    raise SwiftSVDError(f"{p}: not a recognised artifact (give a compressed model folder, an ONNX "
                        "export folder or a .gguf file)")


def _is_artifact(p: Path) -> bool:
    """Whether ``p`` itself (not its children) is an artifact."""
    if p.is_file():
        return p.suffix == ".gguf"
    return p.is_dir() and bool(_graph_files(p) or ((p / "config.json").is_file() and any(p.glob("*.safetensors"))))


def _graph_files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix in _GRAPH_SUFFIXES)


# --- torch -----------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    """Tensor name -> {dtype, shape, data_offsets}, read from the file's JSON header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _kv_dims(cfg: dict) -> tuple[int, int, int]:
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    return int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or heads), head_dim


def torch_artifact(folder: Path) -> Artifact:
    cfg = json.loads((folder / "config.json").read_text())
    files = sorted(folder.glob("*.safetensors"))
    shapes = {k: v["shape"] for f in files for k, v in safetensors_header(f).items()}
    dtypes = Counter(v["dtype"] for f in files for v in safetensors_header(f).values())
    n = {k: _prod(s) for k, s in shapes.items()}
    embed = next((k for k in shapes if k.endswith("embed_tokens.weight")), None)
    elems = sum(v for k, v in n.items() if k != embed)
    if embed is not None:
        row = n[embed] // shapes[embed][0]
        elems += row + (0 if "lm_head.weight" in shapes else n[embed])
    layers, kv_heads, head_dim = _kv_dims(cfg)
    stored = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(dtypes.most_common(1)[0][0], "fp32")
    return Artifact(name=folder.name, kind="torch", path=folder, variant=stored,
                    file_bytes=sum(f.stat().st_size for f in files),
                    weight_bytes_per_token=elems * TORCH_ELEMENT_BYTES,
                    kv_bytes_per_token=2 * layers * kv_heads * head_dim * TORCH_ELEMENT_BYTES)


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


# --- onnx ------------------------------------------------------------------------------------

def onnx_artifact(folder: Path, model_file: str, several: bool) -> Artifact:
    import onnx

    path = folder / model_file
    graph_path = path
    if path.suffix == ".ort":  # the ORT-format file is converted from the .onnx beside it
        graph_path = folder / (path.stem + ".onnx")
        if not graph_path.is_file():
            raise SwiftSVDError(f"{path}: needs {graph_path.name} beside it to read its tensors")
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as e:  # protobuf raises several types on a bad file
        raise SwiftSVDError(f"{graph_path}: not a readable ONNX model ({type(e).__name__})") from None
    variant = "ort" if path.suffix == ".ort" else onnx_variant(model)
    file_bytes = path.stat().st_size
    if path.suffix == ".onnx":
        file_bytes += sum((folder / loc).stat().st_size for loc in _external_files(model))
    return Artifact(name=f"{folder.name}:{variant}" if several else folder.name, kind="onnx",
                    path=folder, variant=variant, file_bytes=file_bytes,
                    weight_bytes_per_token=onnx_weight_bytes(model),
                    kv_bytes_per_token=onnx_kv_bytes(model, folder), model_file=model_file)


def _external_files(model) -> set[str]:
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def _init_bytes(t) -> int:
    import onnx

    return _prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def onnx_variant(model) -> str:
    """int4 / int8 (int4+int8 when mixed) from the quantized MatMul ops, else fp16 / fp32 from the
    initializer bytes."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    bits = {next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "bits"), 4)
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    if bits:
        return "+".join(f"int{b}" for b in sorted(bits))
    if ops & _INT8_OPS:
        return "int8-dynamic"
    by = Counter()
    for t in model.graph.initializer:
        by[t.data_type] += _init_bytes(t)
    return "fp16" if by and by.most_common(1)[0][0] == onnx.TensorProto.FLOAT16 else "fp32"


def onnx_weight_bytes(model) -> int:
    """Initializer bytes read per token; a table only gathered from (the embedding) counts one row."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, i))

    def only_gathered(name: str) -> bool:
        uses = consumers.get(name, [])
        return bool(uses) and all(
            (n.op_type == "Gather" and i == 0) or (n.op_type in _PASS_THROUGH and i == 0
                                                   and all(only_gathered(o) for o in n.output))
            for n, i in uses)

    total = 0
    for t in model.graph.initializer:
        if t.name not in consumers:
            continue
        b = _init_bytes(t)
        total += b // int(t.dims[0]) if only_gathered(t.name) and t.dims else b
    return total


def onnx_kv_bytes(model, folder: Path) -> int:
    """Summed over the ``past_key_values.*`` graph inputs, each with its own (heads, width): a
    latent cache (``--kv-cache latent-v|latent-kv``) holds (1, rank) rows where a dense one holds
    (kv_heads, head_dim). Dims the exporter left symbolic come from config.json."""
    import onnx

    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    if not past:
        raise SwiftSVDError(f"{folder}: not a KV-cache decoder graph (no past_key_values inputs)")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    _, cfg_kv, cfg_hd = _kv_dims(cfg) if cfg else (0, None, None)
    total = 0
    for inp in past:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        heads, width = dims[1] or cfg_kv, dims[3] or cfg_hd
        if not heads or not width:
            raise SwiftSVDError(f"{folder}: cannot tell the shape of the KV cache input {inp.name} (no config.json)")
        total += heads * width * onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
    return total


# --- gguf ------------------------------------------------------------------------------------

def gguf_artifact(path: Path) -> Artifact:
    import gguf

    from ..models import check_gguf

    check_gguf(path)
    r = gguf.GGUFReader(str(path))

    def field(key: str, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    tensors = {t.name: t for t in r.tensors}
    total = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight")
    emb = tensors.get("token_embd.weight")
    if emb is not None:
        rows = _prod(emb.shape) // int(emb.shape[0])  # ggml shape: ne0 (row length) first
        total += int(emb.n_bytes) // rows + (0 if "output.weight" in tensors else int(emb.n_bytes))
    by = Counter()
    for n, t in tensors.items():
        if n != "token_embd.weight" and len(t.shape) >= 2:
            by[t.tensor_type.name.lower()] += int(t.n_bytes)
    heads = int(field(f"{arch}.attention.head_count"))
    head_dim = int(field(f"{arch}.attention.key_length", 0) or field(f"{arch}.embedding_length") // heads)
    v_dim = int(field(f"{arch}.attention.value_length", 0) or head_dim)
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    layers = int(field(f"{arch}.block_count"))
    layout = field("swiftsvd.kv_cache.layout") or [0] * layers  # bit 0: V latent, bit 1: K latent

    def width(il: int, proj: str, bit: int, dense: int) -> int:
        b = tensors.get(f"blk.{il}.attn_{proj}_lr_b.weight")
        return int(b.shape[0]) if layout[il] & bit and b is not None else dense  # B is {k, out}

    kv = sum(width(il, "k", 2, kv_heads * head_dim) + width(il, "v", 1, kv_heads * v_dim) for il in range(layers))
    return Artifact(name=path.name, kind="gguf", path=path,
                    variant="+".join(t for t, _ in by.most_common()) or "unknown",  # e.g. q4_0+q8_0
                    file_bytes=path.stat().st_size, weight_bytes_per_token=total,
                    kv_bytes_per_token=kv * LLAMACPP_KV_BYTES)
