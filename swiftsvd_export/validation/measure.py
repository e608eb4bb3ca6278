"""Speed and peak memory of one artifact, measured in a fresh child process.

A child process per (artifact, thread count) keeps the measurement honest: its peak RSS
(VmHWM) is load + prefill + decode of that model alone, and no runtime's thread pool or
allocator state leaks into the next one. The parent calls ``measure()``; the child is

    python -m swiftsvd_export.validation.measure KIND PATH --threads T --context C \\
        --decode-tokens D --repeats R [--model-file model.onnx]

and prints one JSON line. One untimed warm-up run, then ``repeats`` runs of: prefill
``context`` tokens from an empty cache (timed), decode ``decode_tokens`` tokens one at a time
after it (timed, wall clock, each call returning when its work is done). Reported: medians.
Token ids are random (speed does not depend on them).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SwiftSVDError


def run_child(kind: str, path: Path, threads: int, context: int, decode_tokens: int, repeats: int,
              model_file: str | None = None) -> dict:
    """The measurement itself (runs inside the child process)."""
    import numpy as np

    from ..memory import peak_rss_mib
    from .runtimes import open_runner

    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    runner = open_runner(kind, path, model_file, threads, n_ctx=context + decode_tokens + 8, logits_all=False)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = runner.vocab_size
    ids = [int(x) for x in rng.integers(min(100, vocab - 1), vocab, size=context + decode_tokens)]
    prefill_s, decode_s = [], []
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        t = time.perf_counter()
        runner.prefill(ids[:context])
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for tok in ids[context:]:
            runner.decode(tok)
        t_decode = time.perf_counter() - t
        if rep:
            prefill_s.append(t_prefill)
            decode_s.append(t_decode)
    return {"prefill_tps": context / statistics.median(prefill_s),
            "decode_tps": decode_tokens / statistics.median(decode_s),
            "prefill_s": prefill_s, "decode_s": decode_s, "load_s": load_s,
            "peak_rss_bytes": int(peak_rss_mib() * 2**20)}


def measure(kind: str, path: Path, threads: int, context: int, decode_tokens: int, repeats: int,
            model_file: str | None = None) -> dict:
    """Run ``run_child`` in a fresh interpreter with ``threads`` threads; returns its JSON."""
    cmd = [sys.executable, "-m", "swiftsvd_export.validation.measure", kind, str(path),
           "--threads", str(threads), "--context", str(context), "--decode-tokens", str(decode_tokens),
           "--repeats", str(repeats)] + (["--model-file", model_file] if model_file else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # OpenMP spin-waiting makes multi-threaded runs crawl on a shared CPU (see the README benchmark).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SwiftSVDError(f"{path}: speed measurement failed ({threads} threads): {last}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="time one artifact (child process of `validate`)")
    ap.add_argument("kind", choices=("torch", "onnx", "gguf"))
    ap.add_argument("path", type=Path)
    ap.add_argument("--model-file", default=None)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--decode-tokens", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    a = ap.parse_args(argv)
    try:
        out = run_child(a.kind, a.path, a.threads, a.context, a.decode_tokens, a.repeats, a.model_file)
    except SwiftSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
