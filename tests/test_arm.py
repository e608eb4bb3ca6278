"""The patched llama.cpp on aarch64 (cross-built, run under qemu-user) gives x86's logits, through the
ARM kernels that repack Q4_0 and Q8_0 weights (tools/check_arm.py; README, "On ARM").

Needs qemu-user, the aarch64 cross compilers and the two cross builds, which ``tools/setup.sh --test``
installs and builds (as root with apt). Skipped where they are missing, except in CI (``CI`` set, as
``.ci/run`` runs), where that fails."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from swiftsvd_export.backends.gguf import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_arm  # noqa: E402

from .conftest import skip_or_fail_in_ci  # noqa: E402

pytestmark = pytest.mark.llamacpp_arm


def _need_arm():
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++") if not shutil.which(t)]
    missing += [f"build-llamacpp --arm-arch {a}" for a in check_arm.ARCHS
                if not build.is_built(build.lib_dir(arm_arch=a))]
    if not build.is_built(build.lib_dir()):
        missing.append("build-llamacpp")
    if missing:
        skip_or_fail_in_ci(f"ARM check needs {', '.join(missing)} (tools/setup.sh --test)")


def test_arm_repacked_kernels_match_x86(tmp_path):
    _need_arm()
    args = argparse.Namespace(arm_arch=check_arm.ARCHS, threads=[2], f32_tol=0.05, q_tol=1.0, gguf=None,
                              negative_control=False, json=tmp_path / "arm.json")
    rc = check_arm.check_all(args, tmp_path)
    data = json.loads((tmp_path / "arm.json").read_text())
    failed = [(r["build"], r["file"], r["flash_attn"], r.get("max_abs_diff"), r.get("why")) for r in data["rows"]
              if not r["ok"]]
    assert rc == 0 and data["passed"], failed
    # the kernels under test ran: each quantized file had its weights repacked, 4x8 with i8mm, 4x4 without
    for r in data["rows"]:
        if "f32" not in r["file"]:
            layout = "4x8" if "i8mm" in r["build"] else "4x4"
            assert r["repacked"] and all(k.endswith(layout) for k in r["repacked"]), r
    assert {r["build"] for r in data["rows"]} == set(check_arm.ARCHS)


def _logits_file(path: Path, logits: np.ndarray, phases: list[int]) -> Path:
    """The harness's format (tools/llamacpp_logits.cpp): n_rows, n_vocab, phase per row, float32 logits."""
    path.write_bytes(np.asarray(logits.shape, np.int32).tobytes() + np.asarray(phases, np.int32).tobytes()
                     + logits.astype(np.float32).tobytes())
    return path


def test_comparison_passes_noise_and_near_ties_only(tmp_path):
    """What check_arm calls a pass (runs without qemu): small differences, and top-1 flips only where
    x86's own top-2 margin is smaller than the difference at that position."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 32)) * 2  # below the planted 9s
    ref[2, :2] = [9.0, 8.95]  # a near-tie at position 2
    ref[4, :2] = [9.0, 8.4]   # a winner by 0.6 at position 4
    phases = [0, 0, 0, 1, 2, 2]
    a = _logits_file(tmp_path / "x86.bin", ref, phases)

    def verdict(test: np.ndarray, quantized: bool = True) -> dict:
        return check_arm.compare(a, _logits_file(tmp_path / "arm.bin", test, phases), 1.0 if quantized else 0.05)

    assert verdict(ref + 1e-3, quantized=False)["ok"]
    assert not verdict(ref + 0.2, quantized=False)["ok"]  # F32 tolerance
    flipped = ref.copy()
    flipped[2, :2] = [8.9, 9.0]  # the near-tie flips by 0.1: noise
    r = verdict(flipped)
    assert r["ok"] and [f["position"] for f in r["top1_flips"]] == [2] and r["top1_agree"]["prompt"] == "2/3"
    flipped[4, :2] = [8.8, 8.9]  # it loses: the row moved by 0.5 (within the 1.0 tolerance), less than its margin
    r = verdict(flipped)
    assert not r["ok"] and r["max_abs_diff"] < 1.0 and [f["position"] for f in r["top1_flips"]] == [2, 4]
    assert not verdict(ref + rng.normal(size=ref.shape) * 2)["ok"]  # O(1) errors, as without ggml_cont
