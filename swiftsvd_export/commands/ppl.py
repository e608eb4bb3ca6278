"""``ppl``: perplexity of a model (dense or compressed) with the WikiText-2 protocol."""
from __future__ import annotations

import argparse
import json

from ..models import load_model
from ..perplexity import load_eval_text, perplexity


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ppl", help="perplexity on a text file (WikiText-2 protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize the file as one stream (a .json list of rows is joined with \"\\n\\n\"), cut it "
                    "into non-overlapping windows of --seqlen tokens and score every next-token prediction.",
        epilog="example:\n  swiftsvd-export ppl out/smol-0.4 --text "
               "../shared/data/wikitext2/wikitext-2-raw-v1.test.nnjoin.txt\n")
    p.add_argument("model", help="compressed folder, transformers folder, .gguf, smollm2-135m or gemma3-270m")
    p.add_argument("--text", required=True, help="evaluation text (.txt, or .json list of rows)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    text = load_eval_text(args.text)
    model, tokenizer, _ = load_model(args.model)
    r = perplexity(model, tokenizer, text, args.seqlen, args.max_windows)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['ppl']:.4f}  ({r['windows']} windows of {r['seqlen']} tokens, "
              f"{r['tokens_scored']} tokens scored)")
    return 0
