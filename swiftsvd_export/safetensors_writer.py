"""One safetensors file written tensor by tensor, so a state dict never has to sit in memory.

The safetensors layout is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the data. When every name, dtype and shape is known up front (a
low-rank model whose ranks are chosen), the header can be written first and each tensor's
bytes placed at its offset (``os.pwrite``) whenever it is ready, in any order and in row
chunks. Tensors are laid out as ``safetensors.torch.save_file`` lays them out (by dtype size,
then name), so readers see an ordinary file; the result loads with ``safe_open``/``load_file``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsWriter:
    """``specs`` maps each name to (dtype, shape); :meth:`write` fills them; :meth:`close` checks all were."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = {n: (dt, tuple(int(x) for x in shape)) for n, (dt, shape) in specs.items()}
        order = sorted(self.specs, key=lambda n: (-self.specs[n][0].itemsize, n))
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offsets: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        pos = 0
        for name in order:
            dtype, shape = self.specs[name]
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self.offsets[name], self.sizes[name] = pos, nbytes
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._written = dict.fromkeys(self.specs, 0)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self._fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)
        os.ftruncate(self._fd, self._data_start + pos)

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write ``tensor`` as ``name`` (or as its rows from ``row`` on), cast to the declared dtype."""
        dtype, shape = self.specs[name]
        t = tensor.detach().to(dtype).contiguous()
        if row == 0 and tuple(t.shape) == shape:
            start = 0
        elif len(shape) >= 1 and tuple(t.shape[1:]) == shape[1:] and row + t.shape[0] <= shape[0]:
            start = row * (self.sizes[name] // shape[0] if shape[0] else 0)
        else:
            raise ValueError(f"{name}: got shape {tuple(t.shape)} at row {row}, declared {shape}")
        buf = t.reshape(-1).view(torch.uint8).numpy()
        _pwrite_all(self._fd, memoryview(buf), self._data_start + self.offsets[name] + start)
        self._written[name] += buf.nbytes

    def close(self) -> None:
        """Close the file; raise if a declared tensor was not (fully) written."""
        os.close(self._fd)
        short = [n for n, b in self._written.items() if b != self.sizes[n]]
        if short:
            raise ValueError(f"{self.path}: {len(short)} tensors not written, e.g. {short[:3]}")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite until done (one call writes at most about 2 GiB on Linux)."""
    data = data.cast("B")
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
