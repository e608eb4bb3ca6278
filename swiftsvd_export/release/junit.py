"""The gate as JUnit XML: CI systems already render it (one testcase per threshold per target)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .gate import Check, fmt


def junit_xml(checks: list[Check], suite: str) -> str:
    """``<testsuites>`` with one ``<testsuite>`` per target; a missed threshold is a ``<failure>``."""
    root = ET.Element("testsuites", name=suite, tests=str(len(checks)),
                      failures=str(sum(not c.passed for c in checks)))
    by_target: dict[str, list[Check]] = {}
    for c in checks:
        by_target.setdefault(c.target, []).append(c)
    for target, cs in by_target.items():
        ts = ET.SubElement(root, "testsuite", name=f"{suite}.{target}", tests=str(len(cs)),
                           failures=str(sum(not c.passed for c in cs)), errors="0", skipped="0")
        for c in cs:
            tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{target}",
                               name=f"{c.threshold} = {fmt(c.threshold, c.limit)}")
            if not c.passed:
                ET.SubElement(tc, "failure", message=c.line(), type="threshold").text = c.detail
            else:
                ET.SubElement(tc, "system-out").text = c.detail
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(checks: list[Check], suite: str, path: Path) -> None:
    path.write_text(junit_xml(checks, suite), encoding="utf-8")
