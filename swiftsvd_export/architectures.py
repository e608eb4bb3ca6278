"""Per-architecture descriptions: which linears exist in a decoder block and which share an input.

Like optimum's export configs, one small entry per architecture. Support is decided by
``config.model_type``, never by the model's name.

Quirks and how they are handled (README "Architectures"):

- fused projections (Phi-3 ``qkv_proj``, ``gate_up_proj``) are factorized jointly, as the one
  linear transformers runs: the output covariance is the fused output's, so a single eigh gives
  the rank-k optimum for the sum of the q/k/v (gate/up) output errors, and the loaded model keeps
  the stock module layout;
- biases (Qwen2 q/k/v) stay on the B factor; q/k norms (Qwen3, Gemma 3) act on the projections'
  outputs and are kept dense (they are not linears);
- tied embeddings are never factorized (only decoder-block linears are);
- sliding-window layers get their own attention mask in the calibration pass
  (``covariance.capture_block_inputs`` records the keyword arguments per attention type).
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
    k_proj: str | None = "self_attn.k_proj"  # None: no separate k/v projection (fused qkv)
    v_proj: str | None = "self_attn.v_proj"
    latent_kv: bool = False  # the latent KV cache reference (latent_kv.py) models this attention

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

# Phi-3: q, k, v in one qkv_proj and gate, up in one gate_up_proj, each factorized as one linear.
_PHI3_GROUPS = (
    InputGroup("attn_in", ("self_attn.qkv_proj",)),
    InputGroup("attn_out", ("self_attn.o_proj",)),
    InputGroup("mlp_in", ("mlp.gate_up_proj",)),
    InputGroup("mlp_out", ("mlp.down_proj",)),
)

REGISTRY: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA_GROUPS, latent_kv=True),
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA_GROUPS),  # Qwen2 and Qwen2.5
    "qwen3": ArchSpec("qwen3", "model.layers", _LLAMA_GROUPS),
    "gemma3_text": ArchSpec("gemma3_text", "model.layers", _LLAMA_GROUPS),
    # Gemma 3 with its vision tower: AutoModelForCausalLM gives Gemma3ForConditionalGeneration;
    # only the language model's blocks are factorized.
    "gemma3": ArchSpec("gemma3", "model.language_model.layers", _LLAMA_GROUPS),
    "phi3": ArchSpec("phi3", "model.layers", _PHI3_GROUPS, k_proj=None, v_proj=None),
}


def spec_for(config) -> ArchSpec:
    """The ArchSpec for a transformers config, or a clear error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise SwiftSVDError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[model_type]
