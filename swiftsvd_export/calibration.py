"""Calibration input: read text, build N seeded sequences of L tokens, hash the token ids."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_file
from .errors import SwiftSVDError
from .paths import cache_root

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


def _tokenizer_digest(tokenizer) -> str | None:
    """SHA-256 of a fast tokenizer's full serialization (vocab, merges, normalizer); None otherwise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _tokenize(tokenizer, path: Path, text_field: str) -> list[int]:
    stream: list[int] = []
    for ids in tokenizer(read_texts(path, text_field), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
    return stream


def token_stream(tokenizer, path: str | Path, text_field: str = "text", cache: bool = True) -> torch.Tensor:
    """The calibration text as one token stream (int64), cached on disk so that re-targeting does
    not re-tokenize: keyed by the file's SHA-256, the tokenizer's serialization and ``text_field``
    (``cache_root()/tokens/<key>.pt``; a garbled file is ignored and rewritten)."""
    path = Path(path)
    if not path.is_file():
        raise SwiftSVDError(f"calibration file {path} does not exist")
    tok_digest = _tokenizer_digest(tokenizer) if cache else None
    if tok_digest is None:
        return torch.tensor(_tokenize(tokenizer, path, text_field), dtype=torch.long)
    with open(path, "rb") as f:
        file_digest = hashlib.file_digest(f, "sha256").hexdigest()
    key = hashlib.sha256(f"{file_digest}:{tok_digest}:{text_field}".encode()).hexdigest()[:32]
    entry = cache_root() / "tokens" / f"{key}.pt"
    try:
        return torch.load(entry, weights_only=True).long()
    except Exception:  # missing or garbled: tokenize again
        pass
    ids = torch.tensor(_tokenize(tokenizer, path, text_field), dtype=torch.int32)
    with atomic_file(entry, overwrite=True) as tmp:
        torch.save(ids, tmp)
    return ids.long()


def build_calibration(tokenizer, path: str | Path, nsamples: int, seqlen: int, seed: int = 0,
                      text_field: str = "text", holdout: int = 0, cache: bool = True) -> CalibrationSet:
    """Tokenize the texts as one stream and draw ``nsamples`` distinct, non-overlapping windows.

    Windows are chosen with a seeded generator from the stream cut into ``seqlen`` pieces, so
    the same file, tokenizer and seed give the same token ids (and hash). ``holdout`` > 0 also
    takes up to that many further windows, next in the same permutation, as a held-out slice.
    ``cache`` keeps the token stream on disk (:func:`token_stream`).
    """
    if nsamples < 1 or seqlen < 2:
        raise SwiftSVDError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    stream = token_stream(tokenizer, path, text_field, cache)
    total = stream.numel()
    if total < nsamples * seqlen:
        raise SwiftSVDError(f"calibration file {path} has {total} tokens, fewer than "
                            f"nsamples x seqlen = {nsamples} x {seqlen} = {nsamples * seqlen}")
    pieces = stream[: (total // seqlen) * seqlen].view(-1, seqlen)
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed))
    held = None
    if holdout > 0:
        rest = order[nsamples:nsamples + holdout]
        if len(rest) == 0:
            raise SwiftSVDError(f"the calibration text has no windows left for a held-out slice "
                                f"({len(pieces)} windows of {seqlen}, {nsamples} used); lower --nsamples")
        held = pieces[rest.sort().values].clone()
    return CalibrationSet(pieces[order[:nsamples].sort().values].clone(), str(path), seed, total, held)
