"""Device profiles: ``targets/profiles/<name>.toml`` says which runtime format and export options a
device gets, so a release config names a device instead of repeating export flags.

Profile file::

    description = "..."
    format = "onnx" | "gguf"
    [export]          # onnx: precision, quantize, block_size, accuracy_level, mobile, imatrix, stack_a,
                      # attention ("gqa": dense cache); gguf: factor_type, a_type,
                      # embed_type, imatrix (4-bit weights weighted by the release's calibration; default true);
                      # both: kv_cache (default: latent-v when v_proj is factorized everywhere, else dense)
    [requires]        # rank_multiple: compress ranks must be a multiple of it (quantization blocks)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backends.gguf.cli import EMBED_TYPES, FACTOR_TYPES
from ..backends.onnx.cli import GRAPHS as ONNX_GRAPHS
from ..backends.onnx.cli import PRECISIONS, QUANTIZE
from ..errors import SwiftSVDError
from ..latent_kv import ATTENTIONS
from ..latent_kv import LAYOUTS as KV_LAYOUTS
from .schema import read_toml, take

PROFILES_DIR = Path(__file__).resolve().parents[2] / "targets" / "profiles"

FORMATS = ("onnx", "gguf")
PROFILE_SCHEMA = {"description": str, "format": FORMATS, "export": dict, "requires": dict}
EXPORT_SCHEMA = {
    "onnx": {"precision": PRECISIONS, "quantize": QUANTIZE, "block_size": int, "accuracy_level": int, "mobile": bool,
             "kv_cache": KV_LAYOUTS,
             "graph": ONNX_GRAPHS, "imatrix": bool, "stack_a": bool, "attention": ATTENTIONS},
    "gguf": {"factor_type": FACTOR_TYPES, "a_type": FACTOR_TYPES, "embed_type": EMBED_TYPES, "kv_cache": KV_LAYOUTS,
             "imatrix": bool},
}
REQUIRES_SCHEMA = {"rank_multiple": int}


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    format: str
    export: dict = field(default_factory=dict)
    rank_multiple: int = 1

    def artifact_name(self, target: str) -> str:
        """Where the target's artifact goes under ``artifacts/``: a folder (onnx) or a file (gguf)."""
        return f"{target}.gguf" if self.format == "gguf" else target


def available(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.toml"))


def load_profile(ref: str, base_dir: Path, profiles_dir: Path = PROFILES_DIR) -> Profile:
    """``ref`` is a shipped profile name, or a path to a ``.toml`` (relative to ``base_dir``)."""
    if ref.endswith(".toml"):
        path = (base_dir / Path(ref).expanduser()).resolve()
        if not path.is_file():
            raise SwiftSVDError(f"profile file {path} not found")
    else:
        path = profiles_dir / f"{ref}.toml"
        if not path.is_file():
            names = available(profiles_dir)
            raise SwiftSVDError(f"unknown profile {ref!r}; available profiles: {', '.join(names) or 'none'} "
                                f"(in {profiles_dir}), or give a path to a .toml profile")
    top = take(read_toml(path), PROFILE_SCHEMA, "", path, required=("description", "format"))
    fmt = top["format"]
    export = take(top.get("export", {}), EXPORT_SCHEMA[fmt], "export", path)
    requires = take(top.get("requires", {}), REQUIRES_SCHEMA, "requires", path)
    if fmt == "onnx":
        from ..backends.onnx.export import validate_options

        try:
            validate_options(export.get("precision", "fp32"), export.get("quantize", "none"),
                             export.get("block_size"), export.get("kv_cache") or "dense", export.get("graph"),
                             export.get("accuracy_level"), export.get("attention", "plain"))
        except SwiftSVDError as e:
            raise SwiftSVDError(f"{path}: [export] {e}") from None
    rank_multiple = requires.get("rank_multiple", 1)
    if rank_multiple < 1:
        raise SwiftSVDError(f"{path}: [requires] rank_multiple must be >= 1, got {rank_multiple}")
    return Profile(name=path.stem, path=path, description=top["description"], format=fmt,
                   export=export, rank_multiple=rank_multiple)
