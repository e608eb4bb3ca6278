"""``run``: the default release (targets/releases/default.toml) in one command, no arguments needed."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..release.config import load_config
from .release import execute

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "targets" / "releases" / "default.toml"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="compress the default model and ship it to the default targets, gated (no arguments needed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="`swiftsvd-export release` with the shipped default config: the embedded "
                    "SmolLM2-135M-Instruct, the shipped calibration set, ratio 0.2 (sequential), exported for a "
                    "laptop (llama.cpp Q8_0, onnxruntime fp32) and a phone (onnxruntime int8 + ORT format), "
                    "validated against the dense model and gated on thresholds a 2-core x86 laptop meets. "
                    "Prints the gate table and where the report is. Exit 1 when a threshold misses.",
        epilog="examples:\n"
               "  swiftsvd-export run\n"
               "  swiftsvd-export run --out /tmp/release-default\n"
               "  swiftsvd-export run --config my-release.toml\n")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=f"release config (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default="release-out", help="release folder to write (default ./release-out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing folder (a previous release folder is replaced without it)")
    p.set_defaults(func=lambda args: execute(load_config(args.config), args.out, args.overwrite))
