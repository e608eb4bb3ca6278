"""A checkpoint's weights read a few tensors at a time, never the whole model (layer streaming).

Two kinds of source, both returning float32 tensors under their transformers names:

- safetensors: one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
  (or, without an index, every ``*.safetensors`` in the folder). Files are opened with
  ``safe_open`` (memory-mapped) for each read and closed after it. safetensors >= 0.6 returns
  zero-copy tensors backed by the map, so a float32 checkpoint costs no copy; its pages count
  in the RSS (as file pages) only while the returned tensors live.
- GGUF: gguf-py's reader; each tensor is dequantized on its own, renamed and un-permuted with
  transformers' own GGUF mapping (``get_gguf_hf_weights_map``, ``TENSOR_PROCESSORS``), and the
  mapped pages it touched are dropped again (``madvise(MADV_DONTNEED)``), so reading the whole
  file block by block never leaves it resident.
"""
from __future__ import annotations

import json
import mmap
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import SwiftSVDError


class SafetensorsSource:
    """Tensors of a (possibly sharded) safetensors checkpoint folder."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SwiftSVDError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            self.files = {name: self.folder / fname for name, fname in weight_map.items()}
            for f in set(self.files.values()):
                if not f.is_file():
                    raise SwiftSVDError(f"{index} lists {f.name}, which is missing")
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise SwiftSVDError(f"{self.folder}: no safetensors weights (pickled .bin weights are not loaded)")
            self.files = {}
            for f in shards:
                with safe_open(str(f), framework="pt") as h:
                    self.files.update({name: f for name in h.keys()})
        self.itemsize = self._itemsize()

    def _itemsize(self) -> int:
        """Bytes per parameter of the checkpoint's largest dtype (for memory estimates)."""
        sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}
        out = 1
        for f in set(self.files.values()):
            with open(f, "rb") as h:
                n = int.from_bytes(h.read(8), "little")
                header = json.loads(h.read(n))
            out = max([out] + [sizes.get(v["dtype"], 4) for k, v in header.items() if k != "__metadata__"])
        return out

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """float32 tensors for ``names`` (zero-copy views of the map when the file is float32)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.files:
                raise SwiftSVDError(f"{self.folder}: the checkpoint has no tensor {name}")
            by_file[self.files[name]].append(name)
        out = {}
        for path, members in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in members:
                    out[name] = f.get_tensor(name).float()
        return out

    def rows(self, name: str, max_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 rows) chunks of one tensor, each at most ``max_bytes`` as float32."""
        from safetensors import safe_open

        if name not in self.files:
            raise SwiftSVDError(f"{self.folder}: the checkpoint has no tensor {name}")
        with safe_open(str(self.files[name]), framework="pt") as f:
            sl = f.get_slice(name)
            shape = sl.get_shape()
            if len(shape) < 2:
                yield 0, f.get_tensor(name).float()
                return
            per_row = 4 * max(1, int(torch.tensor(shape[1:]).prod()))
            step = max(1, max_bytes // per_row)
            for start in range(0, shape[0], step):
                yield start, sl[start:start + step].float()


class GGUFSource:
    """Tensors of a GGUF file under their transformers names, dequantized one at a time."""

    def __init__(self, path: Path, model: torch.nn.Module):
        """``path`` already passed ``models.check_gguf``; ``model`` is the skeleton whose names to map to."""
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))
        # the processors read head counts etc. from the config that transformers parsed from the GGUF
        self._parsed = {"config": model.config.to_dict(), "tensors": {}}
        arch = self.reader.fields["general.architecture"].contents()
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self._parsed["config"])
        self._mapping = get_gguf_hf_weights_map(model)  # gguf name -> transformers name
        by_gguf = {t.name: t for t in self.reader.tensors}
        self._tensors = {hf: by_gguf[g] for g, hf in self._mapping.items() if g in by_gguf}
        self.itemsize = 4  # dequantized to float32

    @property
    def names(self) -> set[str]:
        return set(self._tensors)

    def _one(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise SwiftSVDError(f"{self.path}: the GGUF has no tensor for {name}")
        t = self._tensors[name]
        w = dequantize(t.data, t.tensor_type)
        w = self._processor.process(weights=w, name=t.name, tensor_key_mapping=self._mapping,
                                    parsed_parameters=self._parsed).weights
        out = torch.from_numpy(w.copy()).float()
        self._drop_pages()
        return out

    def _drop_pages(self) -> None:
        """Forget the mapped pages read so far: they would otherwise stay in this process's RSS."""
        m = getattr(self.reader.data, "_mmap", None)
        if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self._one(name) for name in names}

    def rows(self, name: str, max_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, self._one(name)  # quantized rows come in blocks: dequantize the tensor whole
