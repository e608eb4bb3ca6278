"""Command-line hooks for ``export --target onnx`` and ``generate --target onnx``."""
from __future__ import annotations

PRECISIONS = ("fp32", "fp16")
QUANTIZE = ("none", "int8", "int4", "int4-a8", "int8-dynamic")
GRAPHS = ("traced", "optimum")  # who writes the decoder graph (export.export_onnx)
KV_CACHE_LAYOUTS = ("dense", "latent-v", "latent-kv")  # checked again by export_onnx (latent_kv.LAYOUTS)


def add_export_arguments(group) -> None:
    # No ``choices=``: an unknown mode must give our own clear message (checked in run_export).
    group.add_argument("--precision", default="fp32",
                       help="weight precision of the ONNX graph: fp32 (default) or fp16")
    group.add_argument("--quantize", default="none",
                       help="weight quantization: none (default), int8 or int4 (blockwise weight-only "
                            "MatMulNBits), int4-a8 (int4, but the A factors int8), int8-dynamic "
                            "(MatMulInteger, int8 activations too)")
    group.add_argument("--block-size", type=int, default=None,
                       help="int8/int4 block size (power of two >= 16; default: the largest of "
                            "128/64/32/16 that divides the factor ranks)")
    group.add_argument("--accuracy-level", type=int, default=None, metavar="{4,1}",
                       help="int8/int4 compute (MatMulNBits accuracy_level): 4 (default) quantizes the "
                            "activations to int8 and runs integer kernels; 1 keeps them fp32, a little more "
                            "accurate, but onnxruntime then dequantizes 8-bit weights on every call "
                            "(8-17x slower decode on SmolLM2)")
    group.add_argument("--mobile", action="store_true",
                       help="also write the ORT format (.ort) and a reduced-operator config")
    group.add_argument("--stack-a", action="store_true",
                       help="one MatMul for the A factors of the linears that read one input (q/k/v, "
                            "gate/up), split by their ranks: the same latents, fewer and wider kernels "
                            "(faster decode with 2+ threads); each linear is still B·(A·x)")
    group.add_argument("--attention", default="plain", metavar="{plain,gqa}",
                       help="attention of the traced graph with a dense KV cache: plain (default; ONNX "
                            "ops, the cache appended by a Concat that copies it every step) or gqa "
                            "(onnxruntime's GroupQueryAttention, one kernel per layer; the project's "
                            "runtime then appends to one preallocated cache in place). Both load in "
                            "optimum's ORTModelForCausalLM; gqa implies --kv-cache dense")
    group.add_argument("--onnx-graph", default=None, metavar="{traced,optimum}",
                       help="who writes the decoder graph: traced (the project's torch reference, lean; "
                            "the default for Llama-family models, and needed by a latent cache) or optimum "
                            "(optimum's exporter; the default for other architectures). Both dense graphs "
                            "load in optimum's ORTModelForCausalLM")


def add_generate_arguments(group) -> None:
    # The shared options (prompt, --max-new-tokens, --temperature, ...) are already defined.
    return None


def run_export(args) -> int:
    from .export import export_onnx

    from ...channel_importance import calibration_text

    imatrix = calibration_text(getattr(args, "imatrix_calib", None), not getattr(args, "no_imatrix", False))
    export_onnx(args.model_dir, args.output, precision=args.precision, quantize=args.quantize,
                imatrix_calib=imatrix, imatrix_samples=getattr(args, "imatrix_samples", 16),
                block_size=args.block_size, mobile=args.mobile, overwrite=args.overwrite,
                accuracy_level=getattr(args, "accuracy_level", None),
                kv_cache=getattr(args, "kv_cache", None),  # None: latent-v when v_proj is factorized everywhere
                graph=getattr(args, "onnx_graph", None), stack_a=getattr(args, "stack_a", False),
                attention=getattr(args, "attention", "plain"))
    return 0


def run_generate(args) -> int:
    from .runtime import generate_cli

    return generate_cli(args)
