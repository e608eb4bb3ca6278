"""Settings of one validation run (the CLI flags, and what ``release`` passes in)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ValidateOptions:
    """Every knob of ``run_validation``; the defaults are the CLI defaults."""

    context: int = 512
    threads: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 3
    decode_tokens: int = 32  # also the greedy continuation length for parity
    ppl_windows: int = 8  # 0: every window of the text
    seqlen: int = 512
    text: Path | None = None  # None: $SWIFTSVD_WIKITEXT_TEST or the shared WikiText-2 test file
    prompts: Path | None = None  # None: the built-in prompts plus a WikiText-2 slice
    probe_bytes: int = 256 * 2**20  # each of the probe's three arrays
    probe_reps: int = 5
    overwrite: bool = False
