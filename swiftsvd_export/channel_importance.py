"""E[x²] of every block linear's input channels, and of every factorized linear's latent A·x.

4-bit weights round 32 values to 16 levels around one scale; the output error depends on each
channel's rounding error times E[x²] of the activation it multiplies, the statistic llama.cpp's
``llama-imatrix`` measures. Low-rank factors need it more than dense weights: B's inputs are the
latents A·x, whose channels differ in energy by orders of magnitude (for swift, E[(A·x)²] is the
kept eigenvalues of the output covariance), so plain 4-bit rounding wastes its levels on channels
that carry nothing. Measured on SmolLM2-135M at ratio 0.4 (README, "Q4_0 factors"): WikiText-2
perplexity in llama.cpp +125 % over torch plain, +47 % weighted.

The vectors are measured at export time by a forward pass of the torch model over a calibration
text, so a dense model gets the same treatment; both targets then quantize with ggml's weighted
quantizer (``backends.gguf.ggml_quantize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SwiftSVDError

LATENT = ".latent"  # suffix of a factorized linear's key for the E[(A·x)²] of its latent


@dataclass
class Importance:
    """E[x²] per input channel, by transformers module name (``<module>.latent`` for B's input)."""

    vectors: dict[str, np.ndarray]
    dataset: str
    chunks: int
    tokens: int = 0

    def describe(self) -> str:
        return f"E[x²] from {self.chunks} x {self.tokens // max(self.chunks, 1)} tokens of {self.dataset}"

    def for_linear(self, module: str, part: str = "") -> np.ndarray:
        """The vector of ``module``'s input (``part`` "") or its latent (``part`` LATENT)."""
        key = module + part
        if key not in self.vectors:
            raise SwiftSVDError(f"no importance measured for {key} (the model changed between measuring and "
                                "writing?)")
        return self.vectors[key]


def calibration_text(text: str | Path | None, weighted: bool = True) -> str | Path | None:
    """The text of the importance pass: ``text``, else the shipped calibration set; None when 4-bit
    weights are to be rounded plainly (``--no-imatrix``, a profile's ``imatrix = false``)."""
    from .calibration import DEFAULT_CALIBRATION

    return (text or DEFAULT_CALIBRATION) if weighted else None


def measure(model_dir: str | Path, calib: str | Path, nsamples: int = 16, seqlen: int = 512,
            seed: int = 0, progress: bool = True, text_field: str = "text") -> Importance:
    """``measure_model`` of a model folder (compressed or dense)."""
    import torch
    from transformers import AutoTokenizer

    from .lowrank import load

    return measure_model(load(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(str(model_dir)),
                         calib, nsamples, seqlen, seed, progress, text_field)


def measure_model(model, tokenizer, calib: str | Path, nsamples: int = 16, seqlen: int = 512, seed: int = 0,
                  progress: bool = True, text_field: str = "text") -> Importance:
    """One forward pass over ``nsamples`` x ``seqlen`` calibration tokens, accumulating E[x²] of every
    block linear's input and of every factorized linear's latent."""
    import torch
    from tqdm.auto import tqdm

    from .calibration import build_calibration
    from .lowrank import LowRankLinear

    calib_set = build_calibration(tokenizer, calib, nsamples, seqlen, seed, text_field, cache=False)
    sums: dict[str, torch.Tensor] = {}
    count = 0

    def hook(key: str, of_output: bool):
        def f(_mod, inputs, output):
            x = (output if of_output else inputs[0]).detach()
            x = x.reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        return f

    hooks = []
    for name, mod in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(mod, LowRankLinear):
            hooks.append(mod.register_forward_hook(hook(name, False)))
            hooks.append(mod.A.register_forward_hook(hook(name + LATENT, True)))
        elif isinstance(mod, torch.nn.Linear) and not name.endswith((".A", ".B")):
            hooks.append(mod.register_forward_hook(hook(name, False)))
    try:
        with torch.no_grad():
            for row in tqdm(calib_set.ids, desc="importance (E[x²])", disable=not progress, unit="seq"):
                model(row[None], use_cache=False)
                count += row.numel()
    finally:
        for h in hooks:
            h.remove()
    vectors = {}
    for key, s in sums.items():
        v = (s / count).float().numpy()
        if not np.isfinite(v).all():
            raise SwiftSVDError(f"importance of {key}: non-finite activations on the calibration text")
        vectors[key] = v
    return Importance(vectors, Path(calib).name, len(calib_set.ids), count)
