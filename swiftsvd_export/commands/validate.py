"""``validate``: parity, perplexity, memory, bandwidth and speed of artifacts, as one report folder."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..validation import ValidateOptions, run_validation

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    d = ValidateOptions()
    p = sub.add_parser(
        "validate", help="measure artifacts (torch folder, ONNX folder, .gguf) into a report folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare every artifact with the torch reference (logits, top-1, KL, greedy), score its "
                    "perplexity, read its weight/KV bytes per token, time prefill and decode in child "
                    "processes, probe the memory bandwidth, and write REPORT_DIR (report.json, report.md, "
                    "PNG plots) atomically. Every .onnx/.ort graph in an ONNX folder is its own artifact.",
        epilog="examples:\n"
               "  swiftsvd-export validate out/smol-0.4 out/smol-0.4-onnx out/smol-0.4.gguf --out report-0.4\n"
               "  swiftsvd-export validate out/smol-0.4-onnx --reference smollm2-135m --out r --threads 1 "
               "--repeats 3 --ppl-windows 4\n")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help="compressed model folder, ONNX export folder, or .gguf file")
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--reference", help="torch reference (folder, .gguf or smollm2-135m; default: the first "
                                       "torch artifact)")
    p.add_argument("--text", type=Path, help="perplexity text (default: $SWIFTSVD_WIKITEXT_TEST or "
                                             "../shared/data/wikitext2/wikitext-2-raw-v1.test.nnjoin.txt)")
    p.add_argument("--prompts", type=Path, help="parity prompts, one per line (default: built-in prompts); "
                                                "a slice of the text is always added")
    p.add_argument("--context", type=int, default=d.context, help=f"prefill length and KV context (default {d.context})")
    p.add_argument("--threads", type=int, nargs="+", default=d.threads,
                   help=f"thread counts to time (default {' '.join(map(str, d.threads))})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"timed runs after one warm-up (default {d.repeats})")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help=f"tokens decoded per run, also the greedy parity length (default {d.decode_tokens})")
    p.add_argument("--ppl-windows", type=int, default=d.ppl_windows,
                   help=f"perplexity windows per artifact, 0 = all (default {d.ppl_windows})")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"perplexity window length (default {d.seqlen})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(func=run)


def run(args) -> int:
    opts = ValidateOptions(context=args.context, threads=args.threads, repeats=args.repeats,
                           decode_tokens=args.decode_tokens, ppl_windows=args.ppl_windows, seqlen=args.seqlen,
                           text=args.text, prompts=args.prompts, overwrite=args.overwrite)
    report = run_validation(args.artifacts, args.out, opts, reference=args.reference)
    log.info("wrote %s (%d artifacts)", args.out, len(report["artifacts"]))
    return 0
