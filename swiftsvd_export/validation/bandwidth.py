"""A STREAM-style memory bandwidth probe, so decode speed can be read as a fraction of what the
memory system delivers (decode of a small model on a CPU is bound by reading its weights).

Copy (b = a) counts 2 x N bytes per pass and triad (a = b + s·c) 3 x N, as STREAM does. numpy
would run the triad as two full passes (5 x N bytes of traffic), so it is done in L2-sized
chunks: the intermediate stays in cache and the traffic is the 3 x N that is counted. One thread
(numpy's element-wise kernels are single-threaded); best of ``reps`` timed passes after one
untimed pass that also faults the pages in.
"""
from __future__ import annotations

import time

import numpy as np

DEFAULT_ARRAY_BYTES = 256 * 2**20  # each of the three arrays; far beyond any desktop LLC
_CHUNK = 32 * 1024  # float64 elements per triad chunk (256 KiB, fits L2)


def _copy(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    np.copyto(b, a)


def _triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, s: float = 3.0) -> None:
    for i in range(0, a.size, _CHUNK):
        j = i + _CHUNK
        np.multiply(c[i:j], s, out=a[i:j])
        np.add(a[i:j], b[i:j], out=a[i:j])


def _best_seconds(kernel, arrays, reps: int) -> float:
    kernel(*arrays)  # untimed: page faults, frequency ramp-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        kernel(*arrays)
        best = min(best, time.perf_counter() - t)
    return best


def probe(array_bytes: int = DEFAULT_ARRAY_BYTES, reps: int = 5) -> dict:
    """Copy and triad GB/s (10^9 bytes/s), in the report's ``bandwidth_probe`` layout."""
    n = max(array_bytes // 8, _CHUNK)
    a, b, c = np.ones(n), np.full(n, 2.0), np.full(n, 0.5)
    copy_s = _best_seconds(_copy, (a, b, c), reps)
    triad_s = _best_seconds(_triad, (a, b, c), reps)
    nbytes = n * 8
    return {"copy_gbps": 2 * nbytes / copy_s / 1e9, "triad_gbps": 3 * nbytes / triad_s / 1e9,
            "array_bytes": int(nbytes), "reps": int(reps)}


def achieved(weight_bytes: int, kv_bytes_at_context: int, decode_tps: float, probe_result: dict,
             threads: int) -> dict:
    """Bytes one decoded token reads x decoded tokens/s, and its share of the triad bandwidth."""
    gbps = (weight_bytes + kv_bytes_at_context) * decode_tps / 1e9
    return {"threads": int(threads), "achieved_gbps": gbps,
            "utilisation": gbps / probe_result["triad_gbps"], "basis": "triad"}
