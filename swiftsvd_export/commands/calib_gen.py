"""``calib-gen``: sample a shippable calibration set from the model itself."""
from __future__ import annotations

import argparse
import json

from ..calib_gen import generate_calibration
from ..errors import SwiftSVDError
from ..models import DEFAULT_MODEL, load_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calib-gen", help="sample calibration text from the model (seeded, data-free)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Each sequence starts at a seeded random vocabulary token and continues by sampling "
                    "the model (temperature 1, top-p 0.95), optionally after --greedy-prefix greedy tokens. "
                    "Writes JSONL records {\"text\": ...}.",
        epilog="example:\n  swiftsvd-export calib-gen smollm2-135m calibration_data/smollm2-135m-selfgen.jsonl "
               "--sequences 80 --length 512 --seed 0\n"
               "  swiftsvd-export calib-gen smollm2-135m /tmp/selfgen-greedy4.jsonl --greedy-prefix 4\n")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("output", help="output .jsonl")
    p.add_argument("--sequences", type=int, default=80)
    p.add_argument("--length", type=int, default=512, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--greedy-prefix", type=int, default=0, metavar="N",
                   help="choose the first N generated tokens greedily, then sample (LLM-QAT's data-free "
                        "generation; default 0: sample from the first)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    model, tokenizer, _ = load_model(args.model)
    if not 0 <= args.greedy_prefix < args.length - 1:
        raise SwiftSVDError(f"--greedy-prefix {args.greedy_prefix} must be in [0, {args.length - 2}] "
                            f"for --length {args.length}")
    r = generate_calibration(model, tokenizer, args.output, args.sequences, args.length, args.seed,
                             args.batch_size, overwrite=args.overwrite, greedy_prefix=args.greedy_prefix)
    print(json.dumps(r, indent=2))
    return 0
