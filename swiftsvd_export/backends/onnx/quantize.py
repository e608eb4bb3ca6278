"""Precision and weight quantization of an exported fp32 graph.

- fp16: every float initializer stored as fp16 (graph inputs/outputs, including the KV cache,
  stay fp32 so the same runtime code and optimum's loader work unchanged);
- int8 / int4: ``MatMulNBitsQuantizer`` -> ``MatMulNBits`` (8- or 4-bit weights, symmetric,
  one scale per block of K along each output column; weight-only). MatMulNBits' block size
  must divide K (the input dimension of each MatMul; for a B factor that is the rank), so each
  MatMul gets the largest block size from the allowed list that divides its K; MatMuls whose K
  no allowed size divides stay fp32 and are listed in the summary.
- int8-dynamic: ``quantize_dynamic`` -> ``MatMulInteger`` (weights int8 per tensor, activations
  uint8 per tensor, per call). On SmolLM2 it loses most of the top-1 agreement (per-tensor
  activation scales cannot hold the outlier channels of the hidden states nor the decaying
  latent of a factor pair), so ``int8`` is blockwise weight-only and this mode is kept for
  runtimes without MatMulNBits.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from ...errors import SwiftSVDError
from .graph import matmul_weights

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers log every node at INFO on the root logger; keep that out."""
    root = logging.getLogger()
    loggers = [root] + [logging.getLogger(n) for n in ("onnxruntime.quantization",
                                                         "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.level))
    try:
        yield
    finally:
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
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         per_channel=False, extra_options={"MatMulConstBOnly": True})
    return {"mode": "int8-dynamic", "op": "MatMulInteger", "weight_type": "int8 per-tensor",
            "activations": "uint8 dynamic"}


def check_block_size(block_size: int | None) -> None:
    if block_size is None:
        return
    if block_size < 16 or block_size & (block_size - 1):
        raise SwiftSVDError(f"--block-size {block_size}: must be a power of two >= 16 (MatMulNBits)")


# accuracy_level of MatMulNBits: 1 = fp32 compute (weights dequantized per block), 4 = int8
# activations. 8-bit weights keep fp32 compute: with int8 activations SmolLM2 loses ~10 points of
# top-1 agreement; 4-bit weights lose as much either way, so they take the faster int8 compute.
ACCURACY_LEVEL = {8: 1, 4: 4}


def plan_nbits(model: onnx.ModelProto, block_size: int | None, bits_of) -> tuple[dict[tuple[int, int], list[str]],
                                                                                list[dict]]:
    """(bits, block size) per MatMul: {(bits, block): [node names]}, plus the MatMuls left unquantized."""
    sizes = (block_size,) if block_size else INT4_BLOCK_SIZES
    plan: dict[tuple[int, int], list[str]] = {}
    skipped = []
    for w in matmul_weights(model):
        if w.op != "MatMul" or w.shape is None:
            continue
        k = w.shape[0]
        bs = next((b for b in sizes if k % b == 0), None)
        if bs is None:
            skipped.append({"node": w.node, "K": k, "N": w.shape[1]})
        else:
            plan.setdefault((bits_of(w.node), bs), []).append(w.node)
    return plan, skipped


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int | None = None, a_bits: int | None = None,
                   a_prefixes: tuple[str, ...] = ()) -> dict:
    """``bits``-bit MatMulNBits for every MatMul whose K a block size divides; with ``a_bits``, the A
    factors (node names under ``a_prefixes``, ``<module>/A/``) get ``a_bits`` instead: A is the factor
    whose rounding costs most (README, "Q4_0 factors")."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_block_size(block_size)
    model = onnx.load(str(src))
    plan, skipped = plan_nbits(model, block_size,
                               lambda node: a_bits if a_bits and node.startswith(a_prefixes) else bits)
    mode = f"int{bits}" + (f"-a{a_bits}" if a_bits else "")
    if not plan:
        raise SwiftSVDError(f"--quantize {mode}: no MatMul has an input dimension that the block size "
                            f"{block_size or INT4_BLOCK_SIZES} divides")
    all_matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    for (b, bs), nodes in sorted(plan.items(), reverse=True):
        # nodes_to_include is OR'ed with the op type in onnxruntime, so exclude the others instead
        with _quiet():
            q = MatMulNBitsQuantizer(model, bits=b, block_size=bs, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL[b],
                                     nodes_to_exclude=sorted(all_matmuls - set(nodes)))
            q.process()
        model = q.model.model
    save_model(model, dst)
    if skipped:
        log.warning("%s: %d MatMul(s) left in fp32 (no block size in %s divides K): %s", mode, len(skipped),
                    (block_size,) if block_size else INT4_BLOCK_SIZES,
                    ", ".join(f"{s['node']} K={s['K']}" for s in skipped[:6]))
    return {"mode": mode, "op": "MatMulNBits", "bits": bits, "a_bits": a_bits, "symmetric": True,
            "accuracy_level": {f"int{b}": ACCURACY_LEVEL[b] for b in {bits, a_bits or bits}},
            "block_sizes": {f"int{b}/{bs}": len(nodes) for (b, bs), nodes in sorted(plan.items(), reverse=True)},
            "left_fp32": skipped}
