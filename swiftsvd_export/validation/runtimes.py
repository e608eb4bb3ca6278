"""One interface over the three runtimes (torch, onnxruntime, llama.cpp), so parity, perplexity
and speed are measured by the same code for every artifact.

A runner has ``logits(ids)`` (positions x vocab, float32, from an empty cache),
``greedy(ids, n)`` (greedy continuation, stopping at EOS) and, for speed, ``prefill(ids)`` /
``decode(token)`` that keep their own KV cache and return once the work is done.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchRunner:
    """A torch model (low-rank or dense) in fp32: the reference, and torch artifacts."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.eos = model, tokenizer, tokenizer.eos_token_id
        self._cache = None

    @classmethod
    def open(cls, path: str | Path) -> "TorchRunner":
        """Load any source ``models.load_model`` accepts (folder, .gguf, embedded name), as fp32."""
        from ..models import load_model

        model, tok, _ = load_model(str(path))
        return cls(model, tok)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def logits(self, ids: list[int]) -> np.ndarray:
        from ..torch_reference import torch_logits

        return torch_logits(self.model, ids)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        from ..torch_reference import torch_greedy

        return torch_greedy(self.model, ids, n, self.eos)

    def prefill(self, ids: list[int]) -> None:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        self._cache = out.past_key_values

    def decode(self, token: int) -> None:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([[token]]), past_key_values=self._cache, use_cache=True,
                             logits_to_keep=1)
        self._cache = out.past_key_values


class OrtRunner:
    """The project's own onnxruntime loop (``OrtDecoder``) on one graph file of an export folder."""

    def __init__(self, folder: Path, model_file: str, threads: int | None):
        from ..backends.onnx.runtime import OrtDecoder

        self.dec = OrtDecoder(folder, threads=threads, model_file=model_file)
        self._cache, self._past = None, 0

    @property
    def vocab_size(self) -> int:
        return int(self.dec._config()["vocab_size"])

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.dec.logits(np.asarray([ids]))[0].astype(np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.dec.generate(ids, n)["tokens"]

    def prefill(self, ids: list[int]) -> None:
        _, self._cache = self.dec.step(np.asarray([ids]), None, 0)
        self._past = len(ids)

    def decode(self, token: int) -> None:
        _, self._cache = self.dec.step(np.asarray([[token]]), self._cache, self._past)
        self._past += 1


class LlamaRunner:
    """The patched llama.cpp through llama-cpp-python, with its default F16 KV cache."""

    def __init__(self, path: Path, threads: int | None, n_ctx: int, logits_all: bool):
        from ..backends.gguf import runtime

        self.rt = runtime
        self.llm = runtime.open_model(path, n_ctx=n_ctx, n_threads=threads, logits_all=logits_all,
                                      n_batch=min(n_ctx, 512))

    @property
    def vocab_size(self) -> int:
        return int(self.llm.n_vocab())

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.rt.logits(self.llm, ids)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.rt.greedy(self.llm, ids, n)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(list(ids))
        self.rt.sync(self.llm)

    def decode(self, token: int) -> None:
        self.llm.eval([token])
        self.rt.sync(self.llm)


def open_runner(kind: str, path: Path, model_file: str | None, threads: int | None, n_ctx: int,
                logits_all: bool = True) -> TorchRunner | OrtRunner | LlamaRunner:
    """A runner for one artifact; ``n_ctx``/``logits_all`` size llama.cpp's context (ignored elsewhere)."""
    if kind == "torch":
        return TorchRunner.open(path)
    if kind == "onnx":
        return OrtRunner(path, model_file, threads)
    return LlamaRunner(path, threads, n_ctx, logits_all)
