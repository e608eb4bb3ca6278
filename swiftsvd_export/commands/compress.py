"""``compress``: Swift-SVD (or a baseline) on a model, written as a low-rank folder."""
from __future__ import annotations

import argparse
import json

from ..calibration import DEFAULT_CALIBRATION
from ..compress import REFIT_RIDGE, CompressConfig, compress, format_summary
from ..factorize import METHODS
from ..lowrank import DTYPES
from ..models import DEFAULT_MODEL


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compress", help="factorize a model's linears with Swift-SVD",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Calibrate, factorize every q/k/v/o/gate/up/down linear as B·A, and write a folder "
                    "(config.json, model.safetensors, manifest.json, tokenizer).",
        epilog="examples:\n"
               f"  swiftsvd-export compress {DEFAULT_MODEL} out/smol-0.4 --ratio 0.4\n"
               "  swiftsvd-export compress ./my-hf-model out/m --ratio 0.2 --calib data.jsonl --method whiten\n"
               "  swiftsvd-export compress ./my-hf-model out/m --ratio 0.2 --calib other-domain.txt --shrink 0.05\n"
               "  swiftsvd-export compress model.gguf out/m --ranks ranks.json --dtype bf16\n"
               f"  swiftsvd-export compress {DEFAULT_MODEL} out/smol-u --ratio 0.4 --allocation uniform\n"
               f"  swiftsvd-export compress {DEFAULT_MODEL} out/smol-l --ratio 0.4 --importance loss\n"
               f"  swiftsvd-export compress {DEFAULT_MODEL} out/smol-50m --target-bytes 50000000\n"
               f"  swiftsvd-export compress {DEFAULT_MODEL} out/smol-p --max-ppl-increase 10 --allocation dynamic\n"
               "  swiftsvd-export compress gemma3-270m out/gemma3-0.2 --ratio 0.2 --nsamples 32\n"
               f"  torchrun --nproc-per-node 2 -m swiftsvd_export.cli compress {DEFAULT_MODEL} out/smol-0.4 --ratio 0.4\n"
               "  swiftsvd-export compress ./my-hf-model out/m --ratio 0.4 --device cuda\n"
               "  swiftsvd-export compress ./big-hf-model out/big --ratio 0.2 --max-memory 8GB\n")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} or gemma3-270m (embedded), a transformers folder, or a .gguf file")
    p.add_argument("output", help="output folder (written atomically)")
    p.add_argument("--ratio", type=float, help="fraction of the compressible linears' parameters to remove, in (0, 1)")
    p.add_argument("--ranks", dest="ranks_file", help="JSON {module_name: rank} with explicit ranks")
    p.add_argument("--target-bytes", type=int, metavar="N",
                   help="largest model whose model.safetensors fits in N bytes at --dtype")
    p.add_argument("--max-ppl-increase", type=float, metavar="P",
                   help="most compression whose held-out calibration perplexity rises by at most P %%")
    p.add_argument("--allocation", choices=["uniform", "dynamic"], default="dynamic",
                   help="dynamic (default): the Swift-SVD paper's rule, each matrix type keeps its uniform budget, "
                        "half as a base rank and half shared between blocks in proportion to "
                        "importance^alpha * log(1 + output norm)^(1 - alpha); uniform: one ratio for every linear "
                        "(ignored with --ranks)")
    p.add_argument("--importance", choices=["cos", "loss"], default="cos",
                   help="dynamic allocation's block importance: cos (default), 1 - cos(block input, output) from the "
                        "calibration pass; loss, the calibration-loss increase when only that block is compressed "
                        "at the uniform rank (one extra partial forward per block, cached per ratio)")
    p.add_argument("--importance-windows", type=int, default=8,
                   help="calibration windows scored for --importance loss (default 8)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="dynamic allocation: weight of the block importance against the matrix's output energy, "
                        "in [0, 1] (default 1.0, chosen on held-out calibration windows; the paper uses 0.6)")
    p.add_argument("--holdout", type=int, default=8,
                   help="held-out calibration windows for --max-ppl-increase and --plots (default 8)")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="do not read or write the covariance/eigendecomposition cache (under $SWIFTSVD_CACHE/stats)")
    p.add_argument("--plots", action="store_true",
                   help="write ranks.png and ppl_vs_ratio.png (held-out, uniform vs dynamic) into the output folder")
    p.add_argument("--method", choices=METHODS, default="swift",
                   help="swift (default), whiten (SVD-LLM) or svd (plain truncation)")
    p.add_argument("--precision", choices=["fp32", "fp64"], default="fp32",
                   help="working precision of the eigendecompositions (default fp32: swift needs no inverse; "
                        "its error is within ~4e-4 relative of the fp64 optimum)")
    p.add_argument("--shrink", type=float, default=0.0, metavar="BETA",
                   help="pull each input covariance toward its diagonal, (1-BETA)·XᵀX + BETA·diag(XᵀX), before "
                        "decomposing, in [0, 1) (default 0: the exact objective): the factors lean less on the "
                        "calibration text's channel correlations. Model-dependent: 0.05 helps SmolLM2 (most with "
                        "the shipped self-generated text), hurts Gemma 3; check on held-out text")
    p.add_argument("--calib", help=f".txt, .jsonl or .parquet calibration text (default: {DEFAULT_CALIBRATION.name})")
    p.add_argument("--text-field", default="text", help="field/column of .jsonl/.parquet holding the text")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward batch")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="stored weight dtype (default fp16)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate block i on the already-compressed blocks before it")
    p.add_argument("--refit", action="store_true",
                   help="with --sequential: refit each B in closed form (least squares) against the dense "
                        "model's outputs of that linear, A kept")
    p.add_argument("--refit-ridge", type=float, default=REFIT_RIDGE, metavar="R",
                   help="with --refit: pull of each refit B toward the plain factors, relative to the mean "
                        f"diagonal of A·XᵀX·Aᵀ (default {REFIT_RIDGE:g}; like GPTQ's dampening)")
    p.add_argument("--rank-multiple", type=int, default=1, nargs="?", const=32,
                   help="round ranks down to a multiple (bare flag: 32, for kernels and quantized formats)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N: where the covariance pass (one block at a time) and the "
                        "eigendecompositions run; expected to match cpu within float32 round-off (Gram matrices "
                        "~1e-6 relative, factors B·A ~1e-4, ranks identical except at exact allocation ties; "
                        "not measured on a GPU yet)")
    p.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others before failing (default "
                        "$SWIFTSVD_DIST_TIMEOUT or 600); must exceed the time rank 0 spends factorizing one block")
    p.add_argument("--stream", action="store_true",
                   help="layer streaming: never load the whole model; one decoder block's weights at a time from "
                        "the safetensors shards or GGUF, output written block by block (implied by --max-memory)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="peak RSS limit for layer streaming, e.g. 8GB or 7.5GiB (K/M/G = powers of 1000); "
                        "activations spill to disk when they do not fit; below one block's needs it names the minimum")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = CompressConfig(model=args.model, output=args.output, ratio=args.ratio, ranks_file=args.ranks_file,
                         method=args.method, calib=args.calib, text_field=args.text_field,
                         nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                         batch_size=args.batch_size, dtype=args.dtype, sequential=args.sequential,
                         rank_multiple=args.rank_multiple, overwrite=args.overwrite,
                         target_bytes=args.target_bytes, max_ppl_increase=args.max_ppl_increase,
                         allocation=args.allocation, alpha=args.alpha, importance=args.importance,
                         importance_windows=args.importance_windows, holdout=args.holdout,
                         cache=args.cache, plots=args.plots, refit=args.refit, refit_ridge=args.refit_ridge,
                         precision=args.precision, shrink=args.shrink, device=args.device, dist_timeout=args.dist_timeout)
    if args.stream or args.max_memory is not None:
        from ..streaming import compress_streaming, format_streaming_summary

        summary = compress_streaming(cfg, args.max_memory)
        print(json.dumps(summary, indent=2) if args.json else format_streaming_summary(summary))
        return 0
    summary = compress(cfg)
    if summary is None:  # a torchrun rank other than 0: it calibrated its shard, rank 0 writes
        return 0
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
