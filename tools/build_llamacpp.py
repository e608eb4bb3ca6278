#!/usr/bin/env python3
"""Build the patched libllama and install llama-cpp-python (same as `swiftsvd-export build-llamacpp`).

    python tools/build_llamacpp.py [--force] [--portable] [--unity] [-j N] [--no-bindings]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swiftsvd_export.backends.gguf.build import main  # noqa: E402
from swiftsvd_export.errors import SwiftSVDError  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SwiftSVDError as e:
        print(f"build_llamacpp: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
