"""``swiftsvd-export validate``: parity, quality, memory, bandwidth and speed of exported artifacts.

The public API is ``run_validation(artifacts, out_dir, options, reference=None) -> dict`` with a
``ValidateOptions``; the report contract (report.json, schema_version 1) is ``schema.json``.
"""
from __future__ import annotations

from .options import ValidateOptions
from .run import run_validation

__all__ = ["ValidateOptions", "run_validation"]
