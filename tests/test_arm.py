"""The patched llama.cpp on aarch64 (cross-built, run under qemu-user) gives x86's logits, through the
ARM kernels that repack Q4_0 and Q8_0 weights (tools/check_arm.py; README, "On ARM").

Needs qemu-user, the aarch64 cross compilers and the two cross builds, which ``tools/setup.sh --test``
installs and builds (as root with apt). Skipped where they are missing, except in CI (``CI`` set, as
``.ci/run`` runs), where that fails."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from swiftsvd_export.backends.gguf import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_arm  # noqa: E402

pytestmark = pytest.mark.llamacpp_arm


def _need_arm():
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++") if not shutil.which(t)]
    missing += [f"build-llamacpp --arm-arch {a}" for a in check_arm.ARCHS
                if not build.is_built(build.lib_dir(arm_arch=a))]
    if not build.is_built(build.lib_dir()):
        missing.append("build-llamacpp")
    if missing:
        msg = f"ARM check needs {', '.join(missing)} (tools/setup.sh --test)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(msg)
        pytest.skip(msg)


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
