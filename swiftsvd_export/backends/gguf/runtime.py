"""Run GGUF files through llama-cpp-python bound to the patched libllama from the build cache."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from collections import deque
from pathlib import Path

import numpy as np

from ...errors import SwiftSVDError
from . import build

_LOG: deque[str] = deque(maxlen=400)
_KV_LOG: deque[str] = deque(maxlen=8)  # llama.cpp's KV cache size lines; its debug output would push them out of _LOG
_VERBOSE = False
_CALLBACK = None  # keep the ctypes callback alive


def patched_lib_dir() -> Path:
    d = build.lib_dir()
    if not build.is_built(d):
        raise SwiftSVDError(
            f"the patched llama.cpp is not built ({d} is missing): run `swiftsvd-export build-llamacpp` "
            f"(or `python tools/build_llamacpp.py`) first")
    return d


def load_llama_cpp():
    """Import llama_cpp bound to the patched library (LLAMA_CPP_LIB_PATH is read once, at import)."""
    global _CALLBACK
    d = patched_lib_dir()
    if "llama_cpp" in sys.modules:
        if os.environ.get("LLAMA_CPP_LIB_PATH") != str(d):
            raise SwiftSVDError("llama_cpp was imported before the patched library was selected; "
                                f"set LLAMA_CPP_LIB_PATH={d} before importing it")
        return sys.modules["llama_cpp"]
    if not build.bindings_installed():
        raise SwiftSVDError(f"llama-cpp-python {build.LLAMA_CPP_PYTHON_VERSION} is not installed: run "
                            "`swiftsvd-export build-llamacpp`")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        msg = text.decode("utf-8", errors="replace")
        _LOG.append(msg)
        if "llama_kv_cache: size" in msg:
            _KV_LOG.append(msg)
        if _VERBOSE:
            print(msg, end="", file=sys.stderr, flush=True)

    _CALLBACK = _cb
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    return llama_cpp


def _load_errors() -> str:
    lines = [m.strip() for m in _LOG if "error" in m.lower() or "missing tensor" in m or "wrong shape" in m]
    return "; ".join(dict.fromkeys(lines)) or "see llama.cpp log (run with -v)"


def open_model(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
               logits_all: bool = False, n_batch: int = 512, verbose: bool = False,
               kv_f32: bool = False, flash_attn: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; load failures become SwiftSVDError naming the cause.

    ``kv_f32`` keeps the KV cache in F32 (llama.cpp's default is F16), for parity checks.
    """
    global _VERBOSE
    path = Path(path)
    if not path.is_file():
        raise SwiftSVDError(f"{path}: no such GGUF file")
    llama_cpp = load_llama_cpp()
    import llama_cpp.llama as ll

    # the first import of llama_cpp.llama installs llama-cpp-python's logger: ours must see the load
    # (its errors, and the KV cache size that kv_cache_log reads)
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    threads = n_threads or max(1, os.cpu_count() or 1)
    _LOG.clear()
    _KV_LOG.clear()
    _VERBOSE = verbose
    try:
        llm = ll.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                       logits_all=logits_all, n_batch=n_batch, n_ubatch=n_batch, verbose=verbose,
                       flash_attn=flash_attn,
                       **({"type_k": 0, "type_v": 0} if kv_f32 else {}))  # 0 = GGML_TYPE_F32
    except ValueError as e:
        raise SwiftSVDError(f"{path}: llama.cpp could not load it: {_load_errors()}") from e
    # llama-cpp-python re-installs its own logger on construction: put ours back.
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    return llm


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers.*?"
                      r"K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB")


def kv_cache_log() -> dict:
    """llama.cpp's own KV cache line (cells, layers, K/V types and MiB) from the last ``open_model``:
    the figure the computed KV bytes per token are checked against."""
    for line in reversed(_KV_LOG):
        m = _KV_LINE.search(line)
        if m:
            return {"mib": float(m[1]), "cells": int(m[2]), "layers": int(m[3]), "type_k": m[4],
                    "k_mib": float(m[5]), "type_v": m[6], "v_mib": float(m[7])}
    raise SwiftSVDError("llama.cpp logged no KV cache size (llama_kv_cache: size = ...)")


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits (len(ids) x vocab) for one sequence, from a fresh KV cache. Needs logits_all=True."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], n_new: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    llm.eval(list(ids))
    eos = llm.token_eos()
    for _ in range(n_new):
        nxt = int(np.argmax(_last_logits(llm)))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


def _last_logits(llm) -> np.ndarray:
    llama_cpp = sys.modules["llama_cpp"]
    n_vocab = llm.n_vocab()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def perf(llm) -> dict:
    """llama.cpp's own timings for the context (llama_perf_context)."""
    llama_cpp = sys.modules["llama_cpp"]
    d = llama_cpp.llama_perf_context(llm.ctx)
    return {"t_p_eval_ms": d.t_p_eval_ms, "n_p_eval": d.n_p_eval, "t_eval_ms": d.t_eval_ms,
            "n_eval": d.n_eval}


def sync(llm) -> None:
    """Wait for queued work, so llama.cpp books its timings per call (llama_synchronize)."""
    sys.modules["llama_cpp"].llama_synchronize(llm.ctx)


def perf_reset(llm) -> None:
    sys.modules["llama_cpp"].llama_perf_context_reset(llm.ctx)


def generate_cli(args) -> int:
    llm = open_model(args.artifact, n_ctx=getattr(args, "gguf_ctx", 2048), n_threads=args.threads,
                     verbose=bool(getattr(args, "verbose", False)))
    prompt = args.prompt
    tmpl = llm.metadata.get("tokenizer.chat_template")
    if getattr(args, "gguf_chat", False) and tmpl:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                         max_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, seed=args.seed)
        print(out["choices"][0]["message"]["content"])
        return 0
    if args.temperature <= 0:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True)
        new = greedy(llm, ids, args.max_new_tokens)
        text = llm.detokenize(new).decode("utf-8", errors="replace")
    else:
        out = llm.create_completion(prompt, max_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, seed=args.seed)
        text = out["choices"][0]["text"]
    print(prompt + text)
    return 0
