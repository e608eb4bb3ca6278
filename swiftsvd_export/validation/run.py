"""``run_validation``: every figure of the report, in order, then one atomic write.

Inputs are checked before any work (artifact kinds, the text, the output folder), so a bad call
fails in a second with one line. The report folder appears only once complete.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
from pathlib import Path

from .. import __version__
from ..atomic import check_output
from ..errors import SwiftSVDError
from . import bandwidth, machine, parity, quality
from .artifacts import Artifact, discover
from .options import ValidateOptions
from .report import write_report
from .runtimes import TorchRunner, open_runner
from .schema import check

log = logging.getLogger(__name__)
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / \
    "wikitext-2-raw-v1.test.nnjoin.txt"


def default_text() -> Path:
    """$SWIFTSVD_WIKITEXT_TEST, else WikiText-2 test in ../shared/data beside the repository."""
    return Path(os.environ.get("SWIFTSVD_WIKITEXT_TEST") or DEFAULT_TEXT)


def _check_options(o: ValidateOptions) -> None:
    for name in ("context", "repeats", "decode_tokens"):
        if getattr(o, name) < 1:
            raise SwiftSVDError(f"--{name.replace('_', '-')} must be >= 1")
    if not o.threads or min(o.threads) < 1:
        raise SwiftSVDError("--threads must be one or more counts >= 1")
    if o.seqlen < 2:
        raise SwiftSVDError("--seqlen must be >= 2")
    if o.ppl_windows < 0:
        raise SwiftSVDError("--ppl-windows must be >= 0 (0: every window)")


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def run_validation(artifacts: list[str | Path], out_dir: Path, options: ValidateOptions,
                   reference: str | Path | None = None) -> dict:
    """Validate ``artifacts`` against the torch ``reference`` (default: the first torch artifact),
    write REPORT_DIR (report.json, report.md, four PNGs) atomically and return report.json's dict."""
    out_dir = Path(out_dir)
    _check_options(options)
    arts = discover(artifacts)
    if not arts:
        raise SwiftSVDError("no artifacts to validate")
    if reference is None:
        reference = next((a.path for a in arts if a.kind == "torch"), None)
        if reference is None:
            raise SwiftSVDError("no torch reference: pass --reference (the compressed folder the "
                                "artifacts came from, or the dense model)")
    text = Path(options.text) if options.text else default_text()
    if not text.is_file():
        raise SwiftSVDError(f"text file {text} does not exist (pass --text or set SWIFTSVD_WIKITEXT_TEST)")
    if any(a.kind == "gguf" for a in arts):
        from ..backends.gguf.runtime import patched_lib_dir

        patched_lib_dir()  # not built: fail now, not after minutes of work
    check_output(out_dir, options.overwrite)
    threads = sorted(set(options.threads))

    log.info("bandwidth probe (%d MiB arrays)", options.probe_bytes // 2**20)
    probe = bandwidth.probe(options.probe_bytes, options.probe_reps)
    log.info("loading the reference %s", reference)
    ref = TorchRunner.open(reference)
    need = options.ppl_windows * options.seqlen if options.ppl_windows else None
    ids = quality.eval_ids(ref.tokenizer, text, None if need is None else max(need, parity.WIKITEXT_SLICE_TOKENS))
    windows = quality.n_windows(ids, options.seqlen, options.ppl_windows)
    prompts = parity.prompt_ids(ref.tokenizer, ids, options.prompts)
    ref_out = parity.ReferenceOutputs.compute(ref, prompts, options.decode_tokens)
    n_ctx = max(options.seqlen, max(map(len, prompts)) + options.decode_tokens) + 8

    entries, ref_ppl = [], None
    for art in arts:
        is_ref = art.kind == "torch" and _same_path(art.path, reference)
        log.info("%s: parity and perplexity", art.name)
        runner = ref if is_ref else open_runner(art.kind, art.path, art.model_file, max(threads), n_ctx)
        entry = _static(art, options)
        entry["parity"] = None if is_ref else parity.parity(ref_out, runner)
        entry["quality"] = quality.perplexity(runner, ids, options.seqlen, windows)
        if is_ref:
            ref_ppl = entry["quality"]["ppl"]
        del runner
        gc.collect()
        _speed(art, entry, options, threads, probe)
        entries.append(entry)
    if ref_ppl is None:
        ref_ppl = quality.perplexity(ref, ids, options.seqlen, windows)["ppl"]
    del ref
    report = {
        "schema_version": 1, "complete": True,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "machine": machine.describe(), "bandwidth_probe": probe,
        "settings": {"context": options.context, "threads": threads, "repeats": options.repeats,
                     "decode_tokens": options.decode_tokens, "text": str(text),
                     "ppl_windows": options.ppl_windows, "seqlen": options.seqlen},
        "reference": {"path": str(reference), "kind": "torch", "ppl": ref_ppl},
        "artifacts": entries,
    }
    check(report)
    write_report(report, out_dir, options.overwrite)
    return report


def _static(art: Artifact, o: ValidateOptions) -> dict:
    return {"name": art.name, "kind": art.kind, "path": str(art.path), "variant": art.variant,
            "file_bytes": art.file_bytes,
            "memory": {"peak_rss_bytes": 0, "weight_bytes_per_token": art.weight_bytes_per_token,
                       "kv_bytes_per_token": art.kv_bytes_per_token,
                       "kv_bytes_at_context": art.kv_bytes_per_token * o.context}}


def _speed(art: Artifact, entry: dict, o: ValidateOptions, threads: list[int], probe: dict) -> None:
    """Speed per thread count (child processes), peak RSS (the largest child's) and bandwidth
    (at the thread count that decodes fastest)."""
    from . import measure  # not at import time: ``python -m ...measure`` imports this package first

    by = {}
    for t in threads:
        log.info("%s: speed, %d thread(s)", art.name, t)
        r = measure.measure(art.kind, art.path, t, o.context, o.decode_tokens, o.repeats, art.model_file)
        by[str(t)] = {"prefill_tps": r["prefill_tps"], "decode_tps": r["decode_tps"]}
        entry["memory"]["peak_rss_bytes"] = max(entry["memory"]["peak_rss_bytes"], r["peak_rss_bytes"])
    entry["speed"] = {"repeats": o.repeats, "by_threads": by}
    best = max(threads, key=lambda t: by[str(t)]["decode_tps"])
    m = entry["memory"]
    entry["bandwidth"] = bandwidth.achieved(m["weight_bytes_per_token"], m["kv_bytes_at_context"],
                                            by[str(best)]["decode_tps"], probe, best)
