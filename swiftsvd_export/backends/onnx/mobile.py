"""``--mobile``: ORT format (``model.ort``) plus the reduced-operator config for onnxruntime-mobile.

Uses onnxruntime's own converter (``python -m onnxruntime.tools.convert_onnx_models_to_ort``)
with the platform-independent "Fixed" optimization style. ``required_operators.config`` is the
file a reduced onnxruntime build takes (``build.sh --include_ops_by_config``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

from ...errors import SwiftSVDError


def parse_operator_config(text: str) -> dict[str, list[str]]:
    """``ai.onnx;14;Add,MatMul`` lines -> {"ai.onnx:14": [ops]}."""
    ops: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, names = line.split(";", 2)
        ops[f"{domain}:{opset}"] = sorted(n.split("{")[0] for n in names.split(",") if n)
    return ops


def convert_to_ort(onnx_path: Path, out_dir: Path) -> dict:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_path = Path(onnx_path)
    with tempfile.TemporaryDirectory(prefix="swiftsvd-ort-") as work:
        work = Path(work)
        src = work / "in"
        src.mkdir()
        for p in onnx_path.parent.iterdir():  # the model plus any external-data file
            if p.name.startswith(onnx_path.name):
                (src / p.name).symlink_to(p.resolve())
        dst = work / "out"
        log = io.StringIO()
        ort_log = logging.getLogger("ort_format_model.utils")  # logs "Created config in <tmp>" at INFO
        level = ort_log.level
        ort_log.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(src / onnx_path.name, output_dir=dst,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:
            raise SwiftSVDError(f"ORT-format conversion failed: {type(e).__name__}: {e}") from e
        finally:
            ort_log.setLevel(level)
        orts = sorted(dst.rglob("*.ort"))
        configs = sorted(dst.rglob("*.config"))
        if not orts or not configs:
            raise SwiftSVDError(f"ORT-format conversion wrote no .ort/.config ({log.getvalue()[-300:]})")
        shutil.move(str(orts[0]), out_dir / "model.ort")
        shutil.move(str(configs[0]), out_dir / "required_operators.config")
    text = (out_dir / "required_operators.config").read_text()
    ops = parse_operator_config(text)
    return {"ort_file": "model.ort", "ort_bytes": (out_dir / "model.ort").stat().st_size,
            "operator_config": "required_operators.config", "optimization_style": "Fixed",
            "operators": ops, "n_operators": sum(len(v) for v in ops.values())}
