"""Write the report folder: report.json, report.md (tables) and the plots, atomically.

Everything is built in a temporary sibling folder and renamed into place at the end, so an
interrupted run never leaves a REPORT_DIR that looks complete.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import atomic_dir
from .plots import write_plots

MIB = 2**20


def write_report(report: dict, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``report`` and its tables and plots into ``out_dir`` (replaced only with ``overwrite``)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_plots(report, tmp)
        (tmp / "report.md").write_text(markdown(report))
    return Path(out_dir)


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(r: dict) -> str:
    """report.md: the machine, the settings, then one table per figure family."""
    m, p, s, arts = r["machine"], r["bandwidth_probe"], r["settings"], r["artifacts"]
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items())
    lines = [
        "# Validation report", "",
        f"Created {r['created']} by swiftsvd-export {r['tool_version']}.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM, {m['os']}, "
        f"Python {m['python']}; {libs}.", "",
        f"Bandwidth probe (one thread, numpy, {p['array_bytes'] / MIB:.0f} MiB arrays, best of {p['reps']}): "
        f"copy {p['copy_gbps']:.1f} GB/s, triad {p['triad_gbps']:.1f} GB/s.", "",
        f"Settings: context {s['context']}, threads {s['threads']}, {s['repeats']} timed repeats (medians, "
        f"after one warm-up), {s['decode_tokens']} decoded tokens (also the greedy length for parity), "
        f"perplexity on {s['text']} ({s['ppl_windows'] or 'all'} windows of {s['seqlen']} tokens).", "",
        f"Reference: {r['reference']['path']} (torch, fp32), perplexity {_f(r['reference']['ppl'])}.", "",
        "## Parity against the reference", "",
    ]
    rows = []
    for a in arts:
        q = a["parity"]
        rows.append([a["name"], a["kind"], a["variant"]] + (
            ["reference", "", "", "", ""] if q is None else
            [f"{q['max_abs_dlogit']:.4g}", f"{q['top1_agreement']:.2%}", f"{q['kl_mean']:.3g}",
             f"{q['greedy_match_len']:.1f} / {q['greedy_tokens']}", f"{q['prompts']} / {q['positions']}"]))
    lines += _table(["artifact", "kind", "variant", "max abs Δlogit", "top-1 agreement", "KL mean",
                     "greedy match", "prompts / positions"], rows)
    lines += ["", "## Quality", ""]
    rows = [[a["name"], _f(a["quality"] and a["quality"]["ppl"]),
             str(a["quality"]["tokens_scored"]) if a["quality"] else "–"] for a in arts]
    lines += _table(["artifact", "perplexity", "tokens scored"], rows)
    lines += ["", "## Memory", "",
              "Weight bytes per token: every tensor a decode step reads (the embedding table as one row, "
              "unless it is also the output head). Torch artifacts run in fp32. Peak RSS: load + prefill + "
              "decode in a child process.", ""]
    rows = []
    for a in arts:
        mem = a["memory"]
        rows.append([a["name"], f"{a['file_bytes'] / MIB:.1f}", f"{mem['weight_bytes_per_token'] / MIB:.1f}",
                     f"{mem['kv_bytes_per_token'] / 1024:.1f}", f"{mem['kv_bytes_at_context'] / MIB:.2f}",
                     f"{mem['peak_rss_bytes'] / MIB:.0f}"])
    lines += _table(["artifact", "file MiB", "weights read/token MiB", "KV/token KiB",
                     f"KV @{s['context']} MiB", "peak RSS MiB"], rows)
    lines += ["", "## Speed and bandwidth", "",
              f"Prefill of {s['context']} tokens from an empty cache, then {s['decode_tokens']} decoded tokens; "
              "achieved bandwidth = (weight bytes + KV bytes at the context) × decode tok/s, at the thread "
              "count that decodes fastest; utilisation is against the triad figure.", ""]
    rows = []
    for a in arts:
        bw = a["bandwidth"]
        for t, v in a["speed"]["by_threads"].items():
            best = int(t) == bw["threads"]
            rows.append([a["name"], t, f"{v['prefill_tps']:.1f}", f"{v['decode_tps']:.1f}",
                         f"{bw['achieved_gbps']:.2f}" if best else "", f"{bw['utilisation']:.1%}" if best else ""])
    lines += _table(["artifact", "threads", "prefill tok/s", "decode tok/s", "achieved GB/s",
                     "utilisation (triad)"], rows)
    lines += ["", "Plots: tokens_per_s.png, memory.png, bandwidth.png, ppl_vs_size.png.", ""]
    return "\n".join(lines)
