"""``release``: compress, export every target, validate against the dense model, gate on thresholds."""
from __future__ import annotations

import argparse
import sys

from ..release.config import ReleaseConfig, describe, load_config

EXIT_GATE_FAILED = 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "release", help="compress + export + validate a model per a TOML config, and gate on thresholds",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the config's compression, export one artifact per [[targets]] entry (a device "
                    "profile from targets/profiles/), validate them all against the dense model, and check "
                    "every threshold. Writes one folder (atomically): model/, artifacts/, validation/ "
                    "(report.json, report.md), release.json, junit.xml, SHA256SUMS. Exit status: 0 when "
                    "every threshold holds, 1 when one misses (each miss printed on one line), 2 on bad input.",
        epilog="examples:\n"
               "  swiftsvd-export release targets/releases/default.toml --out release-out\n"
               "  swiftsvd-export release my-release.toml --check     # only check the config and profiles\n"
               "config format: see swiftsvd_export/release/config.py or targets/releases/default.toml\n")
    p.add_argument("config", help="release config (.toml)")
    p.add_argument("--out", default="release-out", help="release folder to write (default ./release-out)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing folder (a previous release folder is replaced without it)")
    p.add_argument("--check", action="store_true", help="read and check the config, print the plan, run nothing")
    p.set_defaults(func=run)


def execute(cfg: ReleaseConfig, out: str, overwrite: bool) -> int:
    """Run the release and print the gate; shared by ``release`` and ``run``."""
    from ..release.pipeline import run_release

    result = run_release(cfg, out, overwrite=overwrite)
    print(result.summary(), flush=True)
    if not result.passed:
        missed = sum(not c.passed for c in result.checks)
        print(f"swiftsvd-export: gate failed: {missed} of {len(result.checks)} checks missed", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


def run(args) -> int:
    cfg = load_config(args.config)
    if args.check:
        print(describe(cfg))
        return 0
    return execute(cfg, args.out, args.overwrite)
