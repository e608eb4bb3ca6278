"""The report contract: ``schema.json`` (JSON Schema 2020-12), checked before a report is written.

``jsonschema`` is used when installed; otherwise a small checker covering exactly the keywords
``schema.json`` uses, so the contract holds without an extra dependency.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("schema.json")
_TYPES = {"object": dict, "array": list, "string": str, "null": type(None), "boolean": bool}


class ReportSchemaError(ValueError):
    """A report that breaks the contract (a bug in the writer, not a user error)."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def check(report: dict) -> None:
    """Raise ReportSchemaError naming the first place ``report`` breaks schema.json."""
    try:
        import jsonschema
    except ImportError:
        errors = check_minimal(report)
        if errors:
            raise ReportSchemaError(errors[0]) from None
        return
    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(report))
    if err is not None:
        where = "report" + "".join(f"[{p!r}]" for p in err.absolute_path)
        raise ReportSchemaError(f"{where}: {err.message}")


def check_minimal(report: dict) -> list[str]:
    """The fallback checker's findings (all of them), for tests and for machines without jsonschema."""
    return list(_errors(report, schema(), schema(), "report"))


def _is_type(x, t: str) -> bool:
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if t == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return isinstance(x, _TYPES[t])


def _errors(x, s: dict, root: dict, at: str):
    if "$ref" in s:
        s = root["$defs"][s["$ref"].rsplit("/", 1)[-1]]
    if "oneOf" in s:
        errs = [list(_errors(x, sub, root, at)) for sub in s["oneOf"]]
        ok = sum(not e for e in errs)
        if ok > 1:
            yield f"{at}: matches more than one of {s['oneOf']}"
        elif ok == 0:  # report the branch of the right type
            yield from min(errs, key=lambda e: (" is not of type " in e[0], len(e)))
        return
    types = s.get("type")
    if types is not None and not any(_is_type(x, t) for t in ([types] if isinstance(types, str) else types)):
        yield f"{at}: {x!r} is not of type {types}"
        return
    if "const" in s and x != s["const"]:
        yield f"{at}: {x!r} is not {s['const']!r}"
    if "enum" in s and x not in s["enum"]:
        yield f"{at}: {x!r} is not one of {s['enum']}"
    if _is_type(x, "number"):
        if "minimum" in s and x < s["minimum"]:
            yield f"{at}: {x} < {s['minimum']}"
        if "maximum" in s and x > s["maximum"]:
            yield f"{at}: {x} > {s['maximum']}"
        if "exclusiveMinimum" in s and x <= s["exclusiveMinimum"]:
            yield f"{at}: {x} <= {s['exclusiveMinimum']}"
    if isinstance(x, list):
        if len(x) < s.get("minItems", 0):
            yield f"{at}: fewer than {s['minItems']} items"
        for i, item in enumerate(x):
            yield from _errors(item, s.get("items", {}), root, f"{at}[{i}]")
    if isinstance(x, dict):
        for k in s.get("required", []):
            if k not in x:
                yield f"{at}: missing {k!r}"
        if len(x) < s.get("minProperties", 0):
            yield f"{at}: fewer than {s['minProperties']} properties"
        pattern = s.get("propertyNames", {}).get("pattern")
        props, extra = s.get("properties", {}), s.get("additionalProperties", True)
        for k, v in x.items():
            if pattern and not re.search(pattern, k):
                yield f"{at}: property name {k!r} does not match {pattern}"
            if k in props:
                yield from _errors(v, props[k], root, f"{at}[{k!r}]")
            elif extra is False:
                yield f"{at}: unexpected property {k!r}"
            elif isinstance(extra, dict):
                yield from _errors(v, extra, root, f"{at}[{k!r}]")
