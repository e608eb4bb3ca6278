"""The report's four PNGs: tokens/s, memory, bandwidth, and perplexity against file size."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import _plt

MIB = 2**20
PLOTS = ("tokens_per_s.png", "memory.png", "bandwidth.png", "ppl_vs_size.png")


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """Write every plot of ``PLOTS`` into ``out_dir``."""
    plt = _plt()
    arts = report["artifacts"]
    names = [a["name"] for a in arts]
    x = np.arange(len(arts))
    width = max(3.0, 1.0 + 1.2 * len(arts))
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    threads = report["settings"]["threads"]
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 4))
    bar = 0.8 / len(threads)
    for ax, key, title in zip(axes, ("prefill_tps", "decode_tps"),
                              (f"prefill ({report['settings']['context']} tokens)", "decode")):
        for i, t in enumerate(threads):
            ax.bar(x + (i - (len(threads) - 1) / 2) * bar, [a["speed"]["by_threads"][str(t)][key] for a in arts],
                   bar, label=f"{t} thread{'s' if t > 1 else ''}")
        ax.set(title=title, ylabel="tokens/s", xticks=x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    save(fig, "tokens_per_s.png")

    series = [("file", lambda a: a["file_bytes"]), ("weights read / token", lambda a: a["memory"]["weight_bytes_per_token"]),
              (f"KV @{report['settings']['context']}", lambda a: a["memory"]["kv_bytes_at_context"]),
              ("peak RSS", lambda a: a["memory"]["peak_rss_bytes"])]
    fig, ax = plt.subplots(figsize=(width + 1, 4))
    bar = 0.8 / len(series)
    for i, (label, get) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * bar, [get(a) / MIB for a in arts], bar, label=label)
    ax.set(ylabel="MiB", title="memory", xticks=x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    save(fig, "memory.png")

    probe = report["bandwidth_probe"]
    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(x, [a["bandwidth"]["achieved_gbps"] for a in arts], 0.6, label="achieved in decode")
    ax.axhline(probe["triad_gbps"], color="C1", ls="--", label=f"triad probe {probe['triad_gbps']:.1f}")
    ax.axhline(probe["copy_gbps"], color="C2", ls=":", label=f"copy probe {probe['copy_gbps']:.1f}")
    ax.set(ylabel="GB/s", title="memory bandwidth", xticks=x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    save(fig, "bandwidth.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for a in arts:
        if a["quality"]:
            ax.scatter(a["file_bytes"] / MIB, a["quality"]["ppl"])
            ax.annotate(a["name"], (a["file_bytes"] / MIB, a["quality"]["ppl"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    if report["reference"]["ppl"] is not None:
        ax.axhline(report["reference"]["ppl"], color="gray", ls="--", label="reference")
        ax.legend(fontsize=8)
    ax.set(xlabel="file MiB", ylabel="perplexity", title="perplexity vs size")
    save(fig, "ppl_vs_size.png")
    return paths
