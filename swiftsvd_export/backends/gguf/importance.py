"""Importance-weighted 4-bit factors: E[x²] of every weight's input channels, and ggml's quantizer.

Q4_0 rounds 32 weights to 16 levels around one scale. Unweighted, it spends its accuracy evenly over
the input channels; llama.cpp's ``llama-imatrix`` + ``llama-quantize --imatrix`` weight each
channel's rounding error by E[x²] of the activation it multiplies, which is what the matmul's
output error depends on. Low-rank factors need this more than dense weights: B's inputs are the
latents A·x, whose channels differ in energy by orders of magnitude (for swift, E[(A·x)²] is the
kept eigenvalues of the output covariance), so plain Q4_0 wastes its levels on channels that carry
nothing. Measured on SmolLM2-135M at ratio 0.4 (README, "Q4_0 factors"): WikiText-2 perplexity in
llama.cpp +125 % over torch plain, +47 % weighted.

The vectors are measured here, at export time, by a forward pass of the torch model over a
calibration text (the same statistic as llama-imatrix's, so a dense model gets the same treatment),
and the quantization is ggml's own ``ggml_quantize_chunk`` from the libggml-base of the llama.cpp
build (gguf-py only has the unweighted reference quantizers).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import SwiftSVDError

LATENT = ".latent"  # suffix of a factorized linear's key for the E[(A·x)²] of its latent


@dataclass
class Importance:
    """E[x²] per input channel, by transformers module name (``<module>.latent`` for B's input)."""

    vectors: dict[str, np.ndarray]
    dataset: str
    chunks: int
    tokens: int = 0

    def for_linear(self, module: str, part: str = "") -> np.ndarray:
        """The vector of ``module``'s input (``part`` "") or its latent (``part`` LATENT)."""
        key = module + part
        if key not in self.vectors:
            raise SwiftSVDError(f"no importance measured for {key} (the model changed between measuring and "
                                "writing?)")
        return self.vectors[key]


def measure(model_dir: str | Path, calib: str | Path, nsamples: int = 16, seqlen: int = 512,
            seed: int = 0, progress: bool = True, text_field: str = "text") -> Importance:
    """One forward pass of the model folder over ``nsamples`` x ``seqlen`` calibration tokens,
    accumulating E[x²] of every block linear's input and of every factorized linear's latent."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ...calibration import build_calibration
    from ...lowrank import LowRankLinear, load

    model = load(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
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


class GGMLQuantizer:
    """``ggml_quantize_chunk`` of the built libggml-base (the library the GGUF will run on)."""

    def __init__(self, lib_dir: Path):
        path = lib_dir / "libggml-base.so"
        if not path.is_file():
            raise SwiftSVDError(f"importance-weighted Q4_0 needs ggml's quantizer from the llama.cpp build "
                                f"({path} is missing): run `swiftsvd-export build-llamacpp`, or export with "
                                "--no-imatrix")
        self.lib = ctypes.CDLL(str(path))
        fn = self.lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]

    def quantize(self, arr: np.ndarray, qtype, weights: np.ndarray) -> np.ndarray:
        """``arr`` (rows x n, float32) as ``qtype`` blocks, each block's rounding error weighted by ``weights``
        (n,); the same bytes llama-quantize writes with an imatrix."""
        import gguf

        arr = np.ascontiguousarray(arr, dtype=np.float32)
        rows, n = arr.shape
        w = np.ascontiguousarray(weights, dtype=np.float32)
        if w.shape != (n,):
            raise SwiftSVDError(f"importance vector of length {w.shape} for rows of {n}")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        dst = np.empty((rows, n // block * type_size), dtype=np.uint8)
        size = self.lib.ggml_quantize_chunk(int(qtype), arr.ctypes.data, dst.ctypes.data, 0, rows, n, w.ctypes.data)
        if size != dst.nbytes:
            raise SwiftSVDError(f"ggml_quantize_chunk wrote {size} bytes, expected {dst.nbytes}")
        return dst
