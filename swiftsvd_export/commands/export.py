"""``export``: lower a compressed (or dense) model folder to a runtime format."""
from __future__ import annotations

import argparse
import importlib

from ..errors import SwiftSVDError

TARGETS = {"onnx": "onnx", "gguf": "gguf"}


def _backend_cli(target: str):
    return importlib.import_module(f"swiftsvd_export.backends.{TARGETS[target]}.cli")


class _RecordingGroup:
    """An argument group that remembers the actions added to it (argparse keeps its own list private)."""

    def __init__(self, group) -> None:
        self.group = group
        self.actions: list[argparse.Action] = []

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = self.group.add_argument(*args, **kwargs)
        self.actions.append(action)
        return action


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="lower a model folder to ONNX or GGUF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  swiftsvd-export export --target onnx out/smol-0.4 out/smol-0.4-onnx --quantize int8\n"
               "  swiftsvd-export export --target onnx out/smol-0.4 out/smol-0.4-onnx-dense --kv-cache dense\n"
               "  swiftsvd-export export --target onnx out/smol-0.4 out/smol-0.4-optimum --onnx-graph optimum\n"
               "  swiftsvd-export export --target gguf out/smol-0.4 out/smol-0.4.gguf --factor-type q8_0\n"
               "  swiftsvd-export export --target gguf out/smol-0.4 out/smol-0.4-q4.gguf --factor-type q4_0 "
               "--a-type q8_0 --embed-type q8_0 --imatrix-calib my_text.jsonl\n")
    p.add_argument("--target", choices=sorted(TARGETS), required=True)
    p.add_argument("model_dir", help="compressed model folder (or a dense transformers folder)")
    p.add_argument("output", help="output folder (onnx) or file (gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--kv-cache", default=None,
                   help="KV cache layout: dense, latent-v (cache A_V·x, needs v_proj factorized in every "
                        "layer) or latent-kv (cache A_K·x and A_V·x, rebuild K each step); default: "
                        "latent-v when v_proj is factorized in every layer (and, for onnx, the graph is "
                        "traced), else dense. For onnx, "
                        "--kv-cache dense gives the graph optimum's ORTModelForCausalLM loads; a latent "
                        "graph runs with `generate --target onnx` (the project's own loop)")
    p.add_argument("--imatrix-calib", default=None, metavar="FILE",
                   help="4-bit weights (gguf q4_0, onnx int4 / int4-a8): text (.txt/.jsonl/.parquet) whose "
                        "activations weight ggml's rounding, E[x^2] per input channel as llama-imatrix "
                        "measures it (default: the shipped calibration set)")
    p.add_argument("--imatrix-samples", type=int, default=16, metavar="N",
                   help="sequences of 512 tokens for that importance pass (default 16)")
    p.add_argument("--no-imatrix", action="store_true",
                   help="4-bit weights rounded plainly (gguf-py's / onnxruntime's quantizer), no importance pass")
    options = {}
    for target in TARGETS:
        group = _RecordingGroup(p.add_argument_group(f"{target} options"))
        _backend_cli(target).add_export_arguments(group)
        options[target] = [(a.dest, a.default, a.option_strings[0]) for a in group.actions]
    p.set_defaults(func=_run, target_options=options)


def _run(args) -> int:
    # another target's option would be silently ignored: refuse it
    for target, opts in args.target_options.items():
        given = [flag for dest, default, flag in opts if target != args.target and getattr(args, dest) != default]
        if given:
            raise SwiftSVDError(f"{', '.join(given)}: {target} option(s), not for --target {args.target}")
    backend = _backend_cli(args.target)
    # A backend opts in to latent caches by listing its layouts; never export dense in their place.
    if args.kv_cache not in (None, "dense") and args.kv_cache not in getattr(backend, "KV_CACHE_LAYOUTS", ("dense",)):
        raise SwiftSVDError(f"--kv-cache {args.kv_cache} is not supported for --target {args.target}; "
                            f"supported: {', '.join(getattr(backend, 'KV_CACHE_LAYOUTS', ('dense',)))}")
    return backend.run_export(args)
