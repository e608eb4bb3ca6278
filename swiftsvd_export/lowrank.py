"""The low-rank linear layer and the compressed-model folder format.

A factorized linear W (out x in) is stored as two plain linears, ``A`` (k x in) and ``B``
(out x k), so y = B(A(x)). Folder layout (format version 1):

- ``config.json``: the transformers config plus ``swiftsvd = {"format_version": 1,
  "ranks": {module_name: k}}``; linears absent from ``ranks`` are dense.
- ``model.safetensors``: dense tensors under their transformers names; factors as
  ``<module>.A.weight`` and ``<module>.B.weight``.
- ``manifest.json``: how the model was made (method, ratio, ranks, calibration hash, versions).
- tokenizer and generation files copied from the source model.

No pickle and no remote code: loading builds the stock transformers class and swaps modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .errors import SwiftSVDError

FORMAT_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LowRankLinear(nn.Module):
    """y = B(A(x)) (+ bias): two MatMuls, never re-densified."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        rank, in_features = A.shape
        out_features, rank_b = B.shape
        if rank_b != rank:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        mod = cls(in_features, out_features, rank, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            mod.A.weight.copy_(A)
            mod.B.weight.copy_(B)
            if bias is not None:
                mod.B.bias.copy_(bias)
        return mod

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """Ranks of every LowRankLinear in the model, by module name."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _state_dict_for_saving(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to the embeddings, as transformers saves it
    return {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}


def save_lowrank(model: nn.Module, out_dir: Path, dtype: str = "fp16",
                 manifest: dict | None = None, tokenizer=None, weights: bool = True) -> None:
    """Write a compressed model into ``out_dir`` (which the caller makes atomic). ``weights=False``
    leaves model.safetensors to the caller (layer streaming writes it block by block)."""
    if dtype not in DTYPES:
        raise SwiftSVDError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["swiftsvd"] = {"format_version": FORMAT_VERSION, "ranks": lowrank_ranks(model)}
    config["torch_dtype"] = config["dtype"] = str(DTYPES[dtype]).replace("torch.", "")
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if weights:
        save_file(_state_dict_for_saving(model, DTYPES[dtype]), str(out_dir / "model.safetensors"),
                  metadata={"format": "pt", "swiftsvd_format_version": str(FORMAT_VERSION)})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if manifest is not None:
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_config(path: Path) -> dict:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise SwiftSVDError(f"{path}: not a model folder (no config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SwiftSVDError(f"{cfg_path}: invalid JSON ({e})") from None


def is_lowrank_folder(path: Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and "swiftsvd" in read_config(p)


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a compressed model folder as a transformers model with LowRankLinear modules.

    A plain (dense) transformers folder with safetensors weights also loads, with no swaps.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .architectures import spec_for

    path = Path(path)
    raw = read_config(path)
    meta = raw.get("swiftsvd", {"format_version": FORMAT_VERSION, "ranks": {}})
    if meta.get("format_version") != FORMAT_VERSION:
        raise SwiftSVDError(f"{path}: unsupported swiftsvd format version {meta.get('format_version')!r}"
                            f" (this tool reads version {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    spec_for(config)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise SwiftSVDError(f"{path}: no model.safetensors")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, rank in meta["ranks"].items():
        old = model.get_submodule(name)
        with init_empty_weights():
            new = LowRankLinear(old.in_features, old.out_features, int(rank),
                                bias=old.bias is not None, dtype=dtype)
        replace_module(model, name, new)
    sd = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise SwiftSVDError(f"{weights}: tensors do not match the config ({what})")
    model.load_state_dict(sd, strict=False, assign=True)
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    _materialize_buffers(model, config, dtype)
    model.tie_weights()
    return model.eval()


def _materialize_buffers(model: nn.Module, config, dtype: torch.dtype) -> None:
    for name, module in model.named_modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            # a rotary module keeps the config it was built from (Gemma 3's local RoPE has its own theta)
            fresh = type(module)(config=getattr(module, "config", config), device="cpu")
            replace_module(model, name, fresh)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise SwiftSVDError(f"cannot materialize buffer {name} of this architecture")
