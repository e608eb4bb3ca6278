"""Precision and weight quantization of an exported fp32 graph.

- fp16: every float initializer stored as fp16 (graph inputs/outputs, including the KV cache,
  stay fp32 so the same runtime code and optimum's loader work unchanged);
- int8 / int4: ``MatMulNBitsQuantizer`` -> ``MatMulNBits`` (8- or 4-bit weights, symmetric,
  one scale per block of K along each output column; weight-only). MatMulNBits' block size
  must divide K (the input dimension of each MatMul; for a B factor that is the rank), so each
  MatMul gets the largest block size from the allowed list that divides its K; MatMuls whose K
  no allowed size divides stay fp32 and are listed in the summary. With an importance vector
  (``channel_importance``), 4-bit weights take blocks of 32 and ggml's weighted Q4_0 rounding,
  repacked into MatMulNBits (``q4_0_as_nbits``: the two formats encode the same numbers).
- int8-dynamic: ``quantize_dynamic`` -> ``MatMulInteger`` (weights int8 per output column, in 7
  bits; activations uint8 per tensor, per call). On SmolLM2 it loses most of the top-1 agreement
  (per-tensor activation scales cannot hold the outlier channels of the hidden states nor the
  decaying latent of a factor pair), so ``int8`` is blockwise weight-only and this mode is kept
  for runtimes without MatMulNBits. The 7-bit range is what makes the graph right in any
  onnxruntime: x64 CPUs without VNNI add u8·s8 products in pairs in 16 bits, which 255·127·2
  overflows and 255·64·2 does not (README, "int8-dynamic").
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ...channel_importance import LATENT, Importance
from ...errors import SwiftSVDError
from .graph import matmul_weights, onnx_prefix, stacked_members

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers log every node at INFO on the root logger; keep that out, and the
    advice to run its pre-processing (shape inference on graphs that already carry their shapes)."""
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(n) for n in ("onnxruntime.quantization",
                                                         "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.level))

    def no_preprocess_advice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root.addFilter(no_preprocess_advice)
    try:
        yield
    finally:
        root.removeFilter(no_preprocess_advice)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)

INT4_BLOCK_SIZES = (128, 64, 32, 16)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with the weights in ``<name>_data`` beside it when the proto would pass 2 GB."""
    path = Path(path)
    if model.ByteSize() > 1_800_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def quantize_int8_dynamic(src: Path, dst: Path) -> dict:
    """MatMulInteger for every 2D-weight MatMul, weights per output column in [-64, 64]
    (``reduce_range``): the default x64 kernel saturates on full-range weights unless the session
    sets ``session.x64quantprecision``, which a user's runtime does not. A latent-V graph's
    per-head B_V (a 3D weight, one batched MatMul over the KV heads) stays fp32, as the
    MatMulNBits modes leave it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    dims = {i.name: len(i.dims) for i in model.graph.initializer}
    batched = sorted(n.name for n in model.graph.node
                     if n.op_type == "MatMul" and len(n.input) > 1 and dims.get(n.input[1], 2) != 2)
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=True, reduce_range=True, nodes_to_exclude=batched,
                         extra_options={"MatMulConstBOnly": True})
    return {"mode": "int8-dynamic", "op": "MatMulInteger", "weight_type": "int8 per output column, 7-bit range",
            "activations": "uint8 dynamic", "left_fp32": batched}


def check_block_size(block_size: int | None) -> None:
    if block_size is None:
        return
    if block_size < 16 or block_size & (block_size - 1):
        raise SwiftSVDError(f"--block-size {block_size}: must be a power of two >= 16 (MatMulNBits)")


# accuracy_level of MatMulNBits: 4 = activations quantized to int8 per block, integer kernels;
# 1 = fp32 activations. onnxruntime (1.32) has fp32-activation kernels for 4-bit weights only: an
# 8-bit MatMulNBits at level 1 dequantizes its whole weight on every call (on x86 and ARM alike),
# and SmolLM2 decodes 8-17x slower than the same graph at level 4, slower than fp32, for 0.8-1.3 %
# less perplexity (README, "--accuracy-level").
ACCURACY_LEVELS = (1, 4)
DEFAULT_ACCURACY_LEVEL = 4


def check_accuracy_level(accuracy_level: int | None) -> None:
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise SwiftSVDError(f"--accuracy-level {accuracy_level}: choose 4 (int8 activations, fast) or "
                            "1 (fp32 activations; 8-bit weights then dequantize on every call)")


def plan_nbits(model: onnx.ModelProto, block_size: int | None, bits_of,
               block_of_bits: dict[int, int] | None = None) -> tuple[dict[tuple[int, int], list[str]], list[dict]]:
    """(bits, block size) per MatMul: {(bits, block): [node names]}, plus the MatMuls left unquantized.
    ``block_of_bits`` fixes the block for a bit width (importance-weighted 4-bit: 32)."""
    plan: dict[tuple[int, int], list[str]] = {}
    skipped = []
    for w in matmul_weights(model):
        if w.op != "MatMul" or w.shape is None:
            continue
        k, b = w.shape[0], bits_of(w.node)
        fixed = (block_of_bits or {}).get(b)
        sizes = (fixed,) if fixed else (block_size,) if block_size else INT4_BLOCK_SIZES
        bs = next((x for x in sizes if k % x == 0), None)
        if bs is None:
            skipped.append({"node": w.node, "K": k, "N": w.shape[1]})
        else:
            plan.setdefault((b, bs), []).append(w.node)
    return plan, skipped


def q4_0_as_nbits(q4: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml Q4_0 rows (``n`` rows of ``k``; 18-byte blocks: fp16 scale, then qs[j] = q[j] | q[j+16] << 4)
    as MatMulNBits' symmetric 4-bit blocks of 32: packed [n, k/32, 16] (element 2i in the low nibble)
    and scales [n, k/32]. Both decode to (q - 8)·scale, so the numbers are the same."""
    blocks = np.ascontiguousarray(q4).reshape(n, k // 32, 18)
    scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), scales


def importance_key(node: str, prefixes: dict[str, str]) -> str | None:
    """The ``channel_importance`` key of a MatMul node's input (``prefixes``: node-name prefix -> module):
    a factor's A reads the module's input, its B the latent, a dense linear (``<module>/MatMul``) the
    module's input, a stacked A (``stack.py``) its members' shared input."""
    if (stacked := stacked_members(node)) is not None:
        return prefixes.get(f"{stacked[0]}{stacked[1][0]}/")
    for p, m in prefixes.items():
        if node.startswith(p + "A/") or node == p + "MatMul":
            return m
        if node.startswith(p + "B/"):
            return m + LATENT
    return None


def weight_q4_nodes(model: onnx.ModelProto, raw: dict[str, np.ndarray], importance: Importance,
                    quantizer) -> int:
    """Re-quantize every 4-bit, 32-block MatMulNBits whose input has an importance vector with ggml's
    weighted Q4_0 (``llama-quantize --imatrix``'s rounding), in place; returns how many."""
    import gguf

    inits = {i.name: i for i in model.graph.initializer}
    prefixes = {onnx_prefix(m): m for m in {key.removesuffix(LATENT) for key in importance.vectors}}
    done = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs.get("bits") != 4 or attrs.get("block_size") != 32:
            continue
        key = importance_key(node.name.removesuffix("_Q4"), prefixes)
        weight = raw.get(node.input[1].removesuffix("_Q4"))
        if key is None or weight is None or key not in importance.vectors:
            continue
        k, n = weight.shape  # MatMul's W: x (.., K) @ W (K, N); its rows for ggml are W's columns
        q4 = quantizer.quantize(weight.T, gguf.GGMLQuantizationType.Q4_0, importance.vectors[key])
        packed, scales = q4_0_as_nbits(q4, n, k)
        for name, arr in ((node.input[1], packed), (node.input[2], scales)):
            old = inits[name]
            if tuple(old.dims) != arr.shape:  # onnxruntime's MatMulNBits layout is not the one this repacks to
                raise SwiftSVDError(f"{node.name}: MatMulNBits initializer {name} has shape {tuple(old.dims)}, "
                                    f"expected {arr.shape}; export with --no-imatrix")
            old.CopyFrom(numpy_helper.from_array(arr, name))
        done += 1
    return done


def weighted_q4_quantizer(block_size: int | None):
    """ggml's quantizer for importance-weighted 4-bit weights, checked before any work is done: it
    rounds blocks of 32 (Q4_0) and comes from the llama.cpp build."""
    from ..gguf.ggml_quantize import GGMLQuantizer

    check_block_size(block_size)
    if block_size not in (None, 32):
        raise SwiftSVDError(f"importance-weighted int4 uses blocks of 32 (ggml's Q4_0); drop --block-size "
                            f"{block_size} or pass --no-imatrix")
    return GGMLQuantizer.from_build()


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int | None = None, a_bits: int | None = None,
                   a_prefixes: tuple[str, ...] = (), importance: Importance | None = None, quantizer=None,
                   accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict:
    """``bits``-bit MatMulNBits for every MatMul whose K a block size divides; with ``a_bits``, the A
    factors (node names under ``a_prefixes``, ``<module>/A/``, and stacked A's) get ``a_bits`` instead: A is the factor
    whose rounding costs most (README, "Q4_0 factors"). With ``importance`` and ``quantizer``
    (``weighted_q4_quantizer``), 4-bit weights use blocks of 32 and are rounded by ggml, weighted by
    their inputs' E[x²] (``weight_q4_nodes``). ``accuracy_level``: see ``ACCURACY_LEVELS``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_block_size(block_size)
    check_accuracy_level(accuracy_level)
    if importance is None or 4 not in (bits, a_bits):
        quantizer = None
    model = onnx.load(str(src))
    raw = {}  # the fp32 weights, for ggml to round (the MatMulNBits quantizer replaces them)
    if quantizer is not None:
        inits = {i.name: i for i in model.graph.initializer}
        raw = {w.initializer: numpy_helper.to_array(inits[w.initializer])
               for w in matmul_weights(model) if w.op == "MatMul" and w.initializer in inits}
    def bits_of(node: str) -> int:
        is_a = node.startswith(a_prefixes) or stacked_members(node) is not None
        return a_bits if a_bits and is_a else bits

    plan, skipped = plan_nbits(model, block_size, bits_of, block_of_bits={4: 32} if quantizer is not None else None)
    mode = f"int{bits}" + (f"-a{a_bits}" if a_bits else "")
    if not plan:
        raise SwiftSVDError(f"--quantize {mode}: no MatMul has an input dimension that the block size "
                            f"{block_size or INT4_BLOCK_SIZES} divides")
    all_matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    for (b, bs), nodes in sorted(plan.items(), reverse=True):
        # nodes_to_include is OR'ed with the op type in onnxruntime, so exclude the others instead
        with _quiet():
            q = MatMulNBitsQuantizer(model, bits=b, block_size=bs, is_symmetric=True,
                                     accuracy_level=accuracy_level,
                                     nodes_to_exclude=sorted(all_matmuls - set(nodes)))
            q.process()
        model = q.model.model
    weighted = weight_q4_nodes(model, raw, importance, quantizer) if quantizer is not None else 0
    save_model(model, dst)
    if skipped:
        log.warning("%s: %d MatMul(s) left in fp32 (no block size in %s divides K): %s", mode, len(skipped),
                    (block_size,) if block_size else INT4_BLOCK_SIZES,
                    ", ".join(f"{s['node']} K={s['K']}" for s in skipped[:6]))
    return {"mode": mode, "op": "MatMulNBits", "bits": bits, "a_bits": a_bits, "symmetric": True,
            "accuracy_level": accuracy_level,
            "block_sizes": {f"int{b}/{bs}": len(nodes) for (b, bs), nodes in sorted(plan.items(), reverse=True)},
            "left_fp32": skipped, "importance_weighted_nodes": weighted,
            "importance": importance.describe() if weighted else None}
