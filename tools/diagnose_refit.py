#!/usr/bin/env python3
"""Where the least-squares refit of B helps or hurts, block by block (a diagnostic, not a test).

Compresses SmolLM2-135M twice at the same uniform ranks, ``--sequential`` and ``--sequential
--refit``, then runs both and the dense model on WikiText-2 test windows and prints, per block,
the relative error of the block's output against the dense model's, the output's norm against
the dense one, and the norm ratio refit/sequential of every B in a few blocks; plus perplexity
on the same windows. Writes JSON.

    python tools/diagnose_refit.py --nsamples 16 --json bench_out/refit-diagnosis.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
TRAIN = SHARED / "wikitext-2-raw-v1.train.prefix1MB.txt"
TEST = SHARED / "wikitext-2-raw-v1.test.nnjoin.txt"


def block_outputs(model, spec, ids: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
             for layer in spec.layers(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test windows of 512 tokens")
    p.add_argument("--error-windows", type=int, default=2, help="test windows for the block errors")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 3, 10, 20, 29], help="blocks whose B norms to show")
    p.add_argument("--json", default="bench_out/refit-diagnosis.json")
    args = p.parse_args()

    from swiftsvd_export.architectures import spec_for
    from swiftsvd_export.compress import CompressConfig, compress_model, heldout_ppl
    from swiftsvd_export.models import load_model

    dense, tok, folder = load_model("smollm2-135m")
    spec = spec_for(dense.config)
    ids = tok(TEST.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    test = ids[: args.ppl_windows * 512].reshape(args.ppl_windows, 512)
    models, result = {}, {"ratio": args.ratio, "nsamples": args.nsamples, "ppl_windows": args.ppl_windows,
                          "dense_ppl": heldout_ppl(dense, test)}
    for name, refit in (("sequential", False), ("refit", True)):
        m = copy.deepcopy(dense)
        cfg = CompressConfig(model="smollm2-135m", output=None, ratio=args.ratio, calib=str(TRAIN),
                             nsamples=args.nsamples, allocation="uniform", sequential=True, refit=refit,
                             cache=False, progress=False)
        compress_model(m, tok, cfg, source=folder)
        models[name] = m
        result[f"{name}_ppl"] = heldout_ppl(m, test)
        print(f"{name}: ppl {result[f'{name}_ppl']:.3f} (dense {result['dense_ppl']:.3f})", flush=True)
    window = test[: args.error_windows]
    ref = block_outputs(dense, spec, window)
    for name, m in models.items():
        outs = block_outputs(m, spec, window)
        result[f"{name}_block_error"] = [((o - d).norm() / d.norm()).item() for o, d in zip(outs, ref)]
        result[f"{name}_block_norm"] = [(o.norm() / d.norm()).item() for o, d in zip(outs, ref)]
        print(f"{name:10s} block error vs dense: " + " ".join(f"{e:.3f}" for e in result[f"{name}_block_error"]))
        print(f"{name:10s} output norm / dense: " + " ".join(f"{e:.3f}" for e in result[f"{name}_block_norm"]))
    result["b_norm_ratio"] = {}
    for b in args.blocks:
        row = {lin: (spec.layers(models["refit"])[b].get_submodule(lin).B.weight.norm()
                     / spec.layers(models["sequential"])[b].get_submodule(lin).B.weight.norm()).item()
               for lin in spec.linears}
        result["b_norm_ratio"][b] = row
        print(f"block {b:2d} |B| refit / sequential: " + " ".join(f"{k.split('.')[-1]} {v:.3f}" for k, v in row.items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
