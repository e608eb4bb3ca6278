"""The release config (``CONFIG.toml``): model, compression, validation settings, targets, thresholds.

::

    name = "smol-r0.4"                 # optional; default: the file's stem
    model = "smollm2-135m"             # embedded alias, or a path relative to this file
    [compress]                         # CompressConfig fields: ratio, method, calib, nsamples, ...
    ratio = 0.4
    [validate]                         # ValidateOptions fields: context, threads, repeats, ...
    threads = [1]
    [thresholds]                       # defaults for every target (gate.Thresholds fields)
    max_ppl_increase = 50.0
    [[targets]]
    profile = "laptop-x86-onnx-fp32"   # targets/profiles/<profile>.toml, or a path to a .toml
    name = "onnx-fp32"                 # optional; default: the profile name
    [targets.thresholds]               # overrides the defaults for this target
    max_file_bytes = 200_000_000

Everything is checked when the file is read (unknown keys, types, profiles, compression
options), before any minute of compression is spent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..compress import CompressConfig
from ..errors import SwiftSVDError
from ..models import _EMBEDDED
from ..validation import ValidateOptions
from .gate import Thresholds
from .profiles import Profile, load_profile
from .schema import dataclass_schema, read_toml, take

TOP_SCHEMA = {"name": str, "model": str, "compress": dict, "validate": dict, "thresholds": dict,
              "targets": list[dict]}
TARGET_SCHEMA = {"profile": str, "name": str, "thresholds": dict}
# Set by the pipeline itself, not by the config.
COMPRESS_SCHEMA = dataclass_schema(CompressConfig, exclude={"model", "output", "overwrite", "progress"})
VALIDATE_SCHEMA = dataclass_schema(ValidateOptions, exclude={"overwrite"})
THRESHOLDS_SCHEMA = dataclass_schema(Thresholds)
BUDGET_KEYS = ("ratio", "ranks_file", "target_bytes", "max_ppl_increase")
COMPRESS_PATHS = ("calib", "ranks_file")  # str fields of CompressConfig that name files
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Target:
    name: str
    profile: Profile
    thresholds: Thresholds


@dataclass(frozen=True)
class ReleaseConfig:
    path: Path
    name: str
    model: str
    compress: dict  # CompressConfig keyword arguments
    validate: dict  # ValidateOptions keyword arguments
    targets: list[Target]

    def compress_config(self, output: Path) -> CompressConfig:
        return CompressConfig(model=self.model, output=str(output), **self.compress)

    def validate_options(self) -> ValidateOptions:
        return ValidateOptions(**self.validate)

    @property
    def needs_llamacpp(self) -> bool:
        return any(t.profile.format == "gguf" for t in self.targets)


def _name(value: str, what: str, path: Path) -> str:
    if not NAME_RE.match(value):
        raise SwiftSVDError(f"{path}: {what} {value!r} must be letters, digits, '.', '_' or '-' "
                            "(it names a file in the release folder)")
    return value


def load_config(path: str | Path) -> ReleaseConfig:
    """Read and check ``path`` completely; raises SwiftSVDError naming the first problem."""
    path = Path(path).resolve()
    top = take(read_toml(path), TOP_SCHEMA, "", path, required=("model", "targets"))
    model = top["model"]
    if model not in _EMBEDDED:
        model = str((path.parent / Path(model).expanduser()).resolve())

    compress = take(top.get("compress", {}), COMPRESS_SCHEMA, "compress", path)
    for key in COMPRESS_PATHS:
        if key in compress:
            compress[key] = str((path.parent / Path(compress[key]).expanduser()).resolve())
    budgets = [k for k in BUDGET_KEYS if k in compress]
    if len(budgets) != 1:
        raise SwiftSVDError(f"{path}: [compress] give exactly one of {', '.join(BUDGET_KEYS)}"
                            + (f" (got {', '.join(budgets)})" if budgets else ""))
    try:
        CompressConfig(model=model, output="-", **compress).validate()
    except SwiftSVDError as e:
        raise SwiftSVDError(f"{path}: [compress] {e}") from None
    validate = take(top.get("validate", {}), VALIDATE_SCHEMA, "validate", path)

    defaults = take(top.get("thresholds", {}), THRESHOLDS_SCHEMA, "thresholds", path)
    if not top["targets"]:
        raise SwiftSVDError(f"{path}: 'targets' is empty; add at least one [[targets]] table")
    targets: list[Target] = []
    for i, table in enumerate(top["targets"]):
        where = f"targets.{i}"
        t = take(table, TARGET_SCHEMA, where, path, required=("profile",))
        try:
            profile = load_profile(t["profile"], path.parent)
        except SwiftSVDError as e:
            raise SwiftSVDError(f"{path}: [{where}] {e}") from None
        name = _name(t.get("name", profile.name), f"[{where}] name", path)
        if any(name == other.name for other in targets):
            raise SwiftSVDError(f"{path}: [{where}] target name {name!r} is used twice; give one a 'name'")
        multiple = compress.get("rank_multiple", 1)
        if multiple % profile.rank_multiple:
            raise SwiftSVDError(f"{path}: target {name!r} (profile {profile.name}) needs ranks that are a multiple "
                                f"of {profile.rank_multiple}; set [compress] rank_multiple = {profile.rank_multiple}")
        own = take(t.get("thresholds", {}), THRESHOLDS_SCHEMA, f"{where}.thresholds", path)
        targets.append(Target(name, profile, Thresholds(**{**defaults, **own})))
    return ReleaseConfig(path=path, name=_name(top.get("name", path.stem), "name", path), model=model,
                         compress=compress, validate=validate, targets=targets)


def describe(cfg: ReleaseConfig) -> str:
    """A short human summary of what a run will do (``release --check``)."""
    lines = [f"release {cfg.name}: model {cfg.model}, compress {cfg.compress}"]
    for t in cfg.targets:
        limits = ", ".join(f"{k}={v}" for k, v in t.thresholds.limits().items()) or "no thresholds"
        lines.append(f"  {t.name}: {t.profile.format} {t.profile.export} ({t.profile.description}); {limits}")
    return "\n".join(lines)

