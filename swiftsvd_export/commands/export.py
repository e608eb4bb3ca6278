"""``export``: lower a compressed (or dense) model folder to a runtime format."""
from __future__ import annotations

import argparse
import importlib

TARGETS = {"onnx": "onnx", "gguf": "gguf"}


def _backend_cli(target: str):
    return importlib.import_module(f"swiftsvd_export.backends.{TARGETS[target]}.cli")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="lower a model folder to ONNX or GGUF",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  swiftsvd-export export --target onnx out/smol-0.4 out/smol-0.4-onnx --quantize int8\n"
               "  swiftsvd-export export --target gguf out/smol-0.4 out/smol-0.4.gguf --factor-type q8_0\n")
    p.add_argument("--target", choices=sorted(TARGETS), required=True)
    p.add_argument("model_dir", help="compressed model folder (or a dense transformers folder)")
    p.add_argument("output", help="output folder (onnx) or file (gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    for target in TARGETS:
        _backend_cli(target).add_export_arguments(p.add_argument_group(f"{target} options"))
    p.set_defaults(func=lambda a: _backend_cli(a.target).run_export(a))
