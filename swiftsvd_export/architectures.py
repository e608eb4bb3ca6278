"""Per-architecture descriptions: which linears exist in a decoder block and which share an input.

Like optimum's export configs, one small entry per architecture. Support is decided by
``config.model_type``, never by the model's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import SwiftSVDError


@dataclass(frozen=True)
class InputGroup:
    """Linears (paths relative to a decoder block) that read the same input X."""

    name: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    groups: tuple[InputGroup, ...]
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def linear_names(self, model: nn.Module) -> list[str]:
        """Full module names of every compressible linear, in block order."""
        n = len(self.layers(model))
        return [f"{self.layers_path}.{i}.{lin}" for i in range(n) for lin in self.linears]


_LLAMA_GROUPS = (
    InputGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    InputGroup("attn_out", ("self_attn.o_proj",)),
    InputGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA_GROUPS),
}


def spec_for(config) -> ArchSpec:
    """The ArchSpec for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise SwiftSVDError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[model_type]
