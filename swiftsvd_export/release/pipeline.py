"""compress -> export (one artifact per target) -> validate -> gate, into one release folder.

Release folder::

    release.toml        the config as given
    model/              the compressed model folder (``compress``)
    artifacts/<target>  ONNX folder, or ``<target>.gguf``
    validation/         report.json, report.md, plots (``validate``, dense model as reference)
    release.json        targets, export summaries, every gate check, timings
    junit.xml           one testcase per threshold per target
    SHA256SUMS          of every other file (``sha256sum -c SHA256SUMS``)

The folder is built in a hidden temporary sibling and renamed at the end, so an interrupted or
failed run leaves nothing that looks like a release. A run whose gate fails still writes the
folder (the report says why); the caller turns the failures into the exit status.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..atomic import atomic_dir, check_output
from ..errors import SwiftSVDError
from .config import ReleaseConfig, Target
from .gate import Check, evaluate, failures, table
from .junit import write_junit

FORMAT = "swiftsvd-release"
TEXT_SUFFIXES = (".json", ".md", ".txt", ".config")


@dataclass
class ReleaseResult:
    out: Path
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def report(self) -> Path:
        return self.out / "validation" / "report.md"

    def summary(self) -> str:
        """The gate table, the misses, and where everything is."""
        lines = [table(self.checks), ""]
        lines += failures(self.checks) or [f"gate passed: {len(self.checks)} checks"]
        lines += ["", f"release folder: {self.out}", f"report: {self.report}",
                  f"junit: {self.out / 'junit.xml'}"]
        return "\n".join(lines)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_llamacpp() -> None:
    """GGUF targets are validated by the patched llama.cpp: fail before compressing, not after."""
    from ..backends.gguf import build

    d = build.lib_dir()
    if not build.is_built(d) or not build.bindings_installed():
        raise SwiftSVDError(f"a gguf target needs the patched llama.cpp ({d}); run `swiftsvd-export build-llamacpp` "
                            "first (about 20 min once, then cached)")


def is_release_folder(path: Path) -> bool:
    """A previous release's output may be replaced without --overwrite; anything else may not."""
    try:
        return json.loads((path / "release.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_target(model_dir: Path, dest: Path, target: Target, calib: str | None = None,
                  text_field: str = "text") -> dict:
    """Lower the compressed folder with the target profile's export options; the KV cache layout
    is the CLI's default for both formats (V-latent when v_proj is factorized in every layer)
    unless the profile names one. 4-bit weights (GGUF Q4_0, ONNX int4) are importance-weighted
    (unless the profile says ``imatrix = false``) from ``calib``, the release's calibration text
    (default: the shipped set)."""
    from ..channel_importance import calibration_text

    profile = target.profile
    opts = dict(profile.export)
    imatrix = calibration_text(calib, opts.pop("imatrix", True))
    if profile.format == "onnx":
        from ..backends.onnx.export import export_onnx

        return export_onnx(model_dir, dest, **{"kv_cache": None, **opts}, imatrix_calib=imatrix, text_field=text_field)
    from ..backends.gguf.writer import export_gguf

    s = export_gguf(model_dir, dest, quiet=True, **opts, imatrix_calib=imatrix, text_field=text_field)
    return {"format": "gguf", **profile.export, "size_bytes": s.size_bytes, "n_tensors": s.n_tensors,
            "n_lowrank": s.n_lowrank, "n_dense": s.n_dense, "fallbacks": s.fallbacks,
            "importance_weighted_tensors": s.n_weighted, "importance": s.importance or None}


def relocate(folder: Path) -> None:
    """Rewrite ``folder``'s (temporary) absolute path in its text outputs as paths relative to it,
    so the reports stay right after the rename and when the release folder is moved."""
    for f in folder.rglob("*"):
        if f.is_file() and f.suffix in TEXT_SUFFIXES:
            text = f.read_text(encoding="utf-8", errors="surrogateescape")
            if str(folder) in text:
                text = text.replace(f"{folder}/", "").replace(str(folder), ".")
                f.write_text(text, encoding="utf-8", errors="surrogateescape")


def write_checksums(folder: Path) -> None:
    lines = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {f.relative_to(folder).as_posix()}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))


def run_release(cfg: ReleaseConfig, out: str | Path, overwrite: bool = False,
                say: Callable[[str], None] = _stderr) -> ReleaseResult:
    """Run the whole release into ``out`` (atomically); returns the gate result."""
    from ..compress import compress
    from ..validation import run_validation

    out = Path(out).resolve()
    if cfg.needs_llamacpp:
        check_llamacpp()
    overwrite = overwrite or is_release_folder(out)
    check_output(out, overwrite)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copyfile(cfg.path, tmp / "release.toml")
        say(f"[release {cfg.name}] compress {cfg.model} -> model/")
        t = time.perf_counter()
        compressed = compress(cfg.compress_config(tmp / "model"))
        timings["compress_s"] = time.perf_counter() - t

        (tmp / "artifacts").mkdir()
        artifacts: dict[str, Path] = {}
        exports: dict[str, dict] = {}
        for target in cfg.targets:
            dest = tmp / "artifacts" / target.profile.artifact_name(target.name)
            say(f"[release {cfg.name}] export {target.name} ({target.profile.name}) -> {dest.relative_to(tmp)}")
            t = time.perf_counter()
            exports[target.name] = export_target(tmp / "model", dest, target, cfg.compress.get("calib"),
                                                 cfg.compress.get("text_field", "text"))
            timings[f"export_{target.name}_s"] = time.perf_counter() - t
            artifacts[target.name] = dest

        say(f"[release {cfg.name}] validate {len(artifacts)} artifact(s) against the dense {cfg.model}")
        t = time.perf_counter()
        report = run_validation(list(artifacts.values()), tmp / "validation", cfg.validate_options(),
                                reference=cfg.model)
        timings["validate_s"] = time.perf_counter() - t
        checks = evaluate(report, [(t.name, artifacts[t.name], t.thresholds) for t in cfg.targets])

        timings["total_s"] = time.perf_counter() - t_all
        release = {
            "format": FORMAT, "format_version": 1, "swiftsvd_export": __version__, "name": cfg.name,
            "model": cfg.model, "compress": {k: v for k, v in compressed.items() if k != "output"},
            "targets": [{"name": t.name, "profile": t.profile.name, "description": t.profile.description,
                         "format": t.profile.format, "export_options": t.profile.export,
                         "artifact": artifacts[t.name].relative_to(tmp).as_posix(),
                         "thresholds": t.thresholds.limits(), "export": exports[t.name]}
                        for t in cfg.targets],
            "gate": {"passed": all(c.passed for c in checks), "failures": failures(checks),
                     "checks": [c.to_dict() for c in checks]},
            "timings": timings,
        }
        (tmp / "release.json").write_text(json.dumps(release, indent=2, default=str) + "\n")
        write_junit(checks, f"release.{cfg.name}", tmp / "junit.xml")
        relocate(tmp)
        write_checksums(tmp)
    return ReleaseResult(out, checks)
