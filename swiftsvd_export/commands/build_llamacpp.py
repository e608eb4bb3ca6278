"""``build-llamacpp``: build the patched libllama into the cache and install the bindings."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from ..backends.gguf import build

    p = sub.add_parser(
        "build-llamacpp", help="build the patched llama.cpp (libllama) used by the GGUF target",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Download llama-cpp-python {build.LLAMA_CPP_PYTHON_VERSION} (sdist), apply "
                    "targets/llamacpp/patches to its vendored llama.cpp, build only libllama into "
                    "the cache and pip-install the bindings without a native build. A second run "
                    "reuses the cache.",
        epilog="examples:\n"
               "  swiftsvd-export build-llamacpp\n"
               "  swiftsvd-export build-llamacpp --force -j 2\n"
               "  swiftsvd-export build-llamacpp --unpatched --no-bindings   # stock llama.cpp, for a test\n")
    build.add_build_arguments(p)
    p.set_defaults(func=lambda a: build.main(args=a))
