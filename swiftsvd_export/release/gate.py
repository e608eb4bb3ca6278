"""The release gate: thresholds against one validation report -> one pass/fail check per threshold.

Pure functions over a ``report.json`` dict (schema_version 1 of ``swiftsvd-export validate``), so
the gate is testable with hand-built reports and can be re-run on a stored one. A metric the
report does not have (null parity, no quality, a thread count that was not measured) fails its
threshold: a gate must not pass on what it did not see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Thresholds:
    """Limits for one target; None = not checked. ``max_ppl_increase`` is in percent of the dense ppl."""

    max_file_bytes: int | None = None
    max_peak_rss_bytes: int | None = None
    max_ppl: float | None = None
    max_ppl_increase: float | None = None
    max_abs_dlogit: float | None = None
    min_top1_agreement: float | None = None
    max_kl_mean: float | None = None
    min_greedy_match_len: int | None = None
    min_prefill_tps: float | None = None
    min_decode_tps: float | None = None
    min_bandwidth_utilisation: float | None = None
    speed_threads: int | None = None  # which measured thread count the tps limits apply to

    def limits(self) -> dict[str, float]:
        """The set limits, in declaration order (``speed_threads`` is a setting, not a limit)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "speed_threads" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Check:
    target: str
    threshold: str
    limit: float
    value: float | None
    passed: bool
    detail: str  # what was measured, or why nothing was

    def line(self) -> str:
        """One line per miss, naming the target and the threshold."""
        return f"FAIL {self.target}: {self.threshold} = {fmt(self.threshold, self.limit)}: {self.detail}"

    def to_dict(self) -> dict:
        return {"target": self.target, "threshold": self.threshold, "limit": self.limit,
                "value": self.value, "passed": self.passed, "detail": self.detail}


Getter = Callable[[dict, dict, Thresholds], "float | str"]  # a str says why nothing was measured


def _path(d: dict | None, *keys: str):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return f"{'.'.join(keys[:keys.index(k) + 1])} not in the report"
        d = d[k]
    return d


def _ppl_increase(art: dict, report: dict, _t: Thresholds):
    ppl = _path(art, "quality", "ppl")
    ref = _path(report, "reference", "ppl")
    if isinstance(ppl, str) or isinstance(ref, str):
        return ppl if isinstance(ppl, str) else f"dense {ref} (validate with the dense model as reference)"
    return 100.0 * (ppl / ref - 1.0)


def _speed(key: str) -> Getter:
    def get(art: dict, report: dict, t: Thresholds):
        threads = t.speed_threads if t.speed_threads is not None else _first_threads(art)
        return _path(art, "speed", "by_threads", str(threads), key)
    return get


def _first_threads(art: dict) -> str:
    by = (art.get("speed") or {}).get("by_threads") or {}
    return min(by, key=int) if by else "?"


# threshold -> (metric getter, True when the limit is an upper bound)
METRICS: dict[str, tuple[Getter, bool]] = {
    "max_file_bytes": (lambda a, r, t: _path(a, "file_bytes"), True),
    "max_peak_rss_bytes": (lambda a, r, t: _path(a, "memory", "peak_rss_bytes"), True),
    "max_ppl": (lambda a, r, t: _path(a, "quality", "ppl"), True),
    "max_ppl_increase": (_ppl_increase, True),
    "max_abs_dlogit": (lambda a, r, t: _path(a, "parity", "max_abs_dlogit"), True),
    "min_top1_agreement": (lambda a, r, t: _path(a, "parity", "top1_agreement"), False),
    "max_kl_mean": (lambda a, r, t: _path(a, "parity", "kl_mean"), True),
    "min_greedy_match_len": (lambda a, r, t: _path(a, "parity", "greedy_match_len"), False),
    "min_prefill_tps": (_speed("prefill_tps"), False),
    "min_decode_tps": (_speed("decode_tps"), False),
    "min_bandwidth_utilisation": (lambda a, r, t: _path(a, "bandwidth", "utilisation"), False),
}
assert set(METRICS) == {f.name for f in fields(Thresholds)} - {"speed_threads"}


def fmt(threshold: str, v: float | None) -> str:
    if v is None:
        return "-"
    if threshold.endswith("_bytes"):
        return f"{int(v):,}"
    if threshold == "max_ppl_increase":
        return f"{v:+.2f} %"
    if threshold.endswith("_len"):
        return f"{int(v)}"
    return f"{v:.4g}"


def find_artifacts(report: dict, path: str | Path) -> list[dict]:
    """The report entries for the artifact at ``path`` (matched on the resolved path). An ONNX
    folder holding several graphs (model.onnx and its ORT-format model.ort) has one per graph."""
    want = Path(path).resolve()
    return [a for a in report.get("artifacts") or [] if a.get("path") and Path(a["path"]).resolve() == want]


def _check(name: str, key: str, limit: float, arts: list[dict], report: dict, th: Thresholds) -> Check:
    """Every entry of the target must hold the limit: the worst one decides."""
    getter, upper = METRICS[key]
    values = []
    for art in arts:
        value = getter(art, report, th)
        label = f" ({art.get('name')})" if len(arts) > 1 else ""
        if isinstance(value, str) or not math.isfinite(float(value)):
            why = value if isinstance(value, str) else f"measured {value}"
            return Check(name, key, limit, None, False, f"not measured{label}: {why}")
        values.append((float(value), label))
    value, label = max(values) if upper else min(values)
    ok = value <= limit if upper else value >= limit
    rel = ("<=" if ok else ">") if upper else (">=" if ok else "<")
    return Check(name, key, limit, value, ok, f"measured {fmt(key, value)}{label} {rel} {fmt(key, limit)}")


def evaluate(report: dict, targets: list[tuple[str, str | Path, Thresholds]]) -> list[Check]:
    """One Check per set threshold per target; ``targets`` is (name, artifact path, thresholds)."""
    checks = []
    for name, path, th in targets:
        arts = find_artifacts(report, path)
        for key, limit in th.limits().items():
            checks.append(_check(name, key, limit, arts, report, th) if arts else
                          Check(name, key, limit, None, False, f"no artifact {path} in the report"))
    if report.get("complete") is False:
        checks.append(Check("validation", "complete", 1, 0, False, "the validation report is incomplete"))
    return checks


def failures(checks: list[Check]) -> list[str]:
    return [c.line() for c in checks if not c.passed]


def table(checks: list[Check]) -> str:
    """The gate as a plain-text table (what the CLI prints)."""
    rows = [("target", "threshold", "limit", "measured", "result")]
    rows += [(c.target, c.threshold, fmt(c.threshold, c.limit), fmt(c.threshold, c.value),
              "pass" if c.passed else "FAIL") for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) if i < 2 or i == 4 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
