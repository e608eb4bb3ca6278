"""``generate``: run an exported artifact on this machine."""
from __future__ import annotations

import argparse
import importlib

from .export import TARGETS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text with an exported ONNX folder or GGUF file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  swiftsvd-export generate --target onnx out/smol-0.4-onnx \"The capital of France is\"\n"
               "  swiftsvd-export generate --target gguf out/smol-0.4.gguf \"Hello\" --max-new-tokens 32\n")
    p.add_argument("--target", choices=sorted(TARGETS), required=True)
    p.add_argument("artifact", help="ONNX folder or GGUF file")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    for target in TARGETS:
        mod = importlib.import_module(f"swiftsvd_export.backends.{TARGETS[target]}.cli")
        mod.add_generate_arguments(p.add_argument_group(f"{target} options"))
    p.set_defaults(func=lambda a: importlib.import_module(
        f"swiftsvd_export.backends.{TARGETS[a.target]}.cli").run_generate(a))
