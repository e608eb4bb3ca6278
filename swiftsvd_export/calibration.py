"""Calibration input: read text, build N seeded sequences of L tokens, hash the token ids."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SwiftSVDError

# The shipped default set lives in the repository's calibration_data/ (see its README for
# provenance); an editable install (pip install -e .) keeps it reachable from the package.
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "calibration_data" / "smollm2-135m-selfgen.jsonl"


@dataclass
class CalibrationSet:
    ids: torch.Tensor  # (n, seqlen) int64
    source: str
    seed: int
    tokens_available: int
    holdout: torch.Tensor | None = None  # further windows of the same stream, not in ``ids``

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.ids.to(torch.int32).numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        n, seqlen = self.ids.shape
        return {"source": self.source, "nsamples": n, "seqlen": seqlen, "seed": self.seed,
                "tokens_available": self.tokens_available, "token_sha256": self.hash}


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts from a .txt (one text), .jsonl (``text_field`` of each line) or .parquet (a column)."""
    path = Path(path)
    if not path.is_file():
        raise SwiftSVDError(f"calibration file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SwiftSVDError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise SwiftSVDError(f"{path}:{lineno}: no string field {text_field!r}")
            texts.append(record[text_field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise SwiftSVDError(f"{path}: cannot read parquet ({e})") from None
        if text_field not in table.column_names:
            raise SwiftSVDError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
        texts = [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
    else:
        raise SwiftSVDError(f"{path}: unsupported calibration format {suffix!r} (use .txt, .jsonl or .parquet)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SwiftSVDError(f"calibration file {path} is empty")
    return texts


def build_calibration(tokenizer, path: str | Path, nsamples: int, seqlen: int, seed: int = 0,
                      text_field: str = "text", holdout: int = 0) -> CalibrationSet:
    """Tokenize the texts as one stream and draw ``nsamples`` distinct, non-overlapping windows.

    Windows are chosen with a seeded generator from the stream cut into ``seqlen`` pieces, so
    the same file, tokenizer and seed give the same token ids (and hash). ``holdout`` > 0 also
    takes up to that many further windows, next in the same permutation, as a held-out slice.
    """
    if nsamples < 1 or seqlen < 2:
        raise SwiftSVDError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    texts = read_texts(path, text_field)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    total = len(stream)
    if total < nsamples * seqlen:
        raise SwiftSVDError(f"calibration file {path} has {total} tokens, fewer than "
                            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen}")
    pieces = torch.tensor(stream[: (total // seqlen) * seqlen], dtype=torch.long).view(-1, seqlen)
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))
    held = None
    if holdout > 0:
        rest = order[nsamples:nsamples + holdout]
        if len(rest) == 0:
            raise SwiftSVDError(f"the calibration text has no windows left for a held-out slice "
                                f"({len(pieces)} windows of {seqlen}, {nsamples} used); lower --nsamples")
        held = pieces[rest.sort().values].clone()
    return CalibrationSet(pieces[order[:nsamples].sort().values].clone(), str(path), seed, total, held)
