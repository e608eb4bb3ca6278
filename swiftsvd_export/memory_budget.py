"""``--max-memory``: parse the size, estimate what layer streaming needs, decide where activations live.

The estimate is the process's RSS when planning (interpreter, torch, tokenizer, the weightless
model skeleton) plus the largest working set of any one step, plus the calibration
activations (two float32 tensors of n x seqlen x hidden, block i's inputs and outputs):

- one decoder block: its weights as float32 plus one tensor at the checkpoint's dtype while
  it is converted; the float64 input covariances; a forward batch (hidden and MLP activations,
  attention scores); the decompositions (the block's factor bases, twice while they are
  serialized to the statistics store, and the work matrices of the largest eigendecompositions
  that run at once);
- block 0's inputs: the embedding matrix as float32;
- writing: one linear's bases and factors, or a 64 MiB chunk of a copied tensor.

When the activations do not fit next to that, they are spilled to disk and only a batch of
them is in memory. A budget below baseline + one block (activations spilled) is refused with
that minimum. Sizes are estimates, so the run also checks the real peak (VmHWM) after every
block and fails if it went over.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from .errors import SwiftSVDError
from .memory import rss_bytes  # noqa: F401  (streaming reads it here, so a test can stand in for it)
from .ranks import break_even

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MARGIN = 0.10  # slack on the estimate for allocator fragmentation and small objects
COPY_CHUNK = 64 * 2**20  # bytes of a non-block tensor copied at once


def parse_size(text: str | int | None) -> int | None:
    """'8GB' -> 8e9, '7.5GiB' -> 7.5 * 2**30, '512MB', '1000000' (bytes). K/M/G/T are powers of 1000."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise SwiftSVDError(f"--max-memory {text!r} is not a size (examples: 8GB, 7.5GiB, 512MB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise SwiftSVDError(f"--max-memory must be positive, got {text!r}")
    return value


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class MemoryPlan:
    budget: int | None
    baseline: int
    block: int  # the largest per-step working set
    activations_ram: int  # both activation tensors in RAM
    activations_disk: int  # what stays in RAM when they are spilled
    spill: bool

    @property
    def minimum(self) -> int:
        return int((self.baseline + self.block + min(self.activations_ram, self.activations_disk)) * (1 + MARGIN))

    @property
    def planned(self) -> int:
        acts = self.activations_disk if self.spill else self.activations_ram
        return int((self.baseline + self.block + acts) * (1 + MARGIN))

    def describe(self) -> dict:
        return dict(asdict(self), minimum=self.minimum, planned=self.planned)


def block_working_set(config, linears: dict[str, tuple[int, int]], groups: dict[str, int], block_params: int,
                      batch: int, seqlen: int, source_itemsize: int, workers: int = 1) -> int:
    """Bytes one decoder block needs at its busiest (module docstring). ``linears``: the block's
    (out, in) shapes; ``groups``: each input group's width (its covariance is width² float64);
    ``workers``: how many decompositions run at once (``linalg_pool.workers``)."""
    h = config.hidden_size
    inter = max(max(o, i) for o, i in linears.values())
    heads = getattr(config, "num_attention_heads", 1)
    largest = max(o * i for o, i in linears.values())
    weights = 4 * block_params + source_itemsize * largest
    grams = sum(8 * d * d for d in groups.values()) + 12 * max(groups.values()) ** 2
    tokens = batch * seqlen
    forward = 4 * tokens * (8 * h + 4 * inter) + 2 * 4 * batch * heads * seqlen * seqlen
    bases = sum(4 * o * max(break_even(o, i), 0) for o, i in linears.values())
    work = sum(sorted((4 * (3 * min(o, i) ** 2 + 2 * o * i) for o, i in linears.values()), reverse=True)[:workers])
    return weights + grams + max(forward, 2 * bases + work)


def plan(budget: int | None, baseline: int, config, block_linears: dict[str, tuple[int, int]],
         groups: dict[str, int], block_params: int, nsamples: int, seqlen: int, batch: int,
         source_itemsize: int, workers: int = 1) -> MemoryPlan:
    """Where the activations go, or a clear error when ``budget`` is below the minimum."""
    h = config.hidden_size
    block = block_working_set(config, block_linears, groups, block_params, batch, seqlen, source_itemsize,
                              workers)
    embed = (4 + source_itemsize) * config.vocab_size * h
    write = max(COPY_CHUNK, max(4 * (o * break_even(o, i) + 2 * o * i) for o, i in block_linears.values()))
    need = max(block, embed, write)
    acts_ram = 2 * 4 * nsamples * seqlen * h
    acts_disk = 3 * 4 * min(batch, nsamples) * seqlen * h
    p = MemoryPlan(budget, baseline, need, acts_ram, acts_disk, spill=False)
    if budget is None:
        return p
    if budget < p.minimum:
        # The baseline varies by some 20 MB between runs: suggest 5 % more, rounded up to 0.05 GiB.
        suggest = math.ceil(p.minimum * 1.05 / (0.05 * 2**30)) * 0.05
        raise SwiftSVDError(
            f"--max-memory {gib(budget)} is below the {gib(p.minimum)} this model needs with layer streaming "
            f"(process {gib(baseline)} + one block's working set {gib(need)} + activations "
            f"{gib(min(acts_ram, acts_disk))}, +{MARGIN:.0%} margin); give at least --max-memory {suggest:.2f}GiB "
            f"or lower --batch-size/--seqlen")
    p.spill = p.planned > budget and acts_disk < acts_ram
    return p
