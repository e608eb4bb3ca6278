"""ggml's own quantizer (``ggml_quantize_chunk``, from the llama.cpp build's libggml-base) with an
importance vector, as ``llama-quantize --imatrix`` runs it: gguf-py has only the unweighted
reference quantizers. The vectors come from ``channel_importance``."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ...errors import SwiftSVDError


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

    @classmethod
    def from_build(cls) -> "GGMLQuantizer":
        """The quantizer of the cached llama.cpp build, or one line saying how to get it (or do without)."""
        from .runtime import patched_lib_dir

        try:
            return cls(patched_lib_dir())
        except SwiftSVDError as e:
            raise SwiftSVDError(f"importance-weighted 4-bit weights need ggml's quantizer: {e}; or export "
                                "with --no-imatrix") from None

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
