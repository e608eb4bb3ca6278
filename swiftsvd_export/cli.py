"""The ``swiftsvd-export`` command line: one subcommand per module in ``commands/``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import SwiftSVDError

DESCRIPTION = ("Training-free low-rank compression of LLMs (Swift-SVD), lowered to llama.cpp (GGUF) and "
               "onnxruntime (ONNX), validated and gated for release.")

COMMANDS = ("compress", "ppl", "calib_gen", "export", "generate", "build_llamacpp", "validate", "release", "run")

EPILOG = """examples:
  swiftsvd-export run                      # the default model, compressed, exported, validated, gated
  swiftsvd-export compress smollm2-135m out/smol-0.4 --ratio 0.4
  swiftsvd-export ppl out/smol-0.4 --text ../shared/data/wikitext2/wikitext-2-raw-v1.test.nnjoin.txt
  swiftsvd-export export --target onnx out/smol-0.4 out/smol-0.4-onnx
  swiftsvd-export export --target gguf out/smol-0.4 out/smol-0.4.gguf
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swiftsvd-export", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        from .models import check_transformers

        check_transformers()
        return int(args.func(args) or 0)
    except SwiftSVDError as e:
        if args.verbose:
            raise
        print(f"swiftsvd-export {args.command}: error: {e}", file=sys.stderr)
        dist = sys.modules.get("swiftsvd_export.distributed")
        if dist is not None:
            dist.exit_on_error(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"swiftsvd-export {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
