"""Shared by the benchmarks in tools/: run one measurement in a fresh Python process (its own peak
RSS, thread settings and environment) and read back the JSON line it prints last."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_json_child(script: str | Path, args: list, env: dict | None = None) -> dict:
    """``python script *args``; its last stdout line as JSON. A failed child stops the benchmark
    with the command and the tail of its stderr."""
    cmd = [sys.executable, str(script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
