"""Strict TOML tables: every key known, every value of the declared type, one-line errors.

A release config runs for minutes before it exports anything; a typo (``ratoi``) or a quoted
number must stop it at once with the key and the type it wants, not be ignored or crash later.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path

from ..errors import SwiftSVDError

# A schema maps a key to a type hint (int, float, str, bool, Path, list[int], dict for a sub-table,
# X | None) or to a tuple of allowed strings.
Schema = dict[str, object]


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SwiftSVDError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise SwiftSVDError(f"{path}: not valid TOML: {e}") from None


def dataclass_schema(cls, exclude: set[str] = frozenset()) -> Schema:
    """The keys and types of a dataclass's fields, so a table follows the options it feeds."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in exclude}


def _strip_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def describe(hint) -> str:
    hint = _strip_none(hint)
    if isinstance(hint, tuple):
        return "one of " + ", ".join(repr(c) for c in hint)
    if typing.get_origin(hint) is list:
        return f"a list of {describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)",
            Path: "a path (string)", dict: "a table"}[hint]


def _toml_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _coerce(value, hint, base_dir: Path):
    """``value`` converted to ``hint``, or None when it does not fit."""
    hint = _strip_none(hint)
    if isinstance(hint, tuple):
        return value if isinstance(value, str) and value in hint else None
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            return None
        items = [_coerce(v, typing.get_args(hint)[0], base_dir) for v in value]
        return None if any(i is None for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if hint is int:
        return value if isinstance(value, int) else None
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else None
    if hint is str:
        return value if isinstance(value, str) else None
    if hint is Path:
        return (base_dir / Path(value).expanduser()).resolve() if isinstance(value, str) else None
    if hint is dict:
        return value if isinstance(value, dict) else None
    raise TypeError(f"schema type {hint!r} not supported")


def take(table: dict, schema: Schema, where: str, source: Path, required: tuple[str, ...] = ()) -> dict:
    """Check ``table`` against ``schema``; returns the given keys with converted values.

    Relative paths resolve against ``source``'s folder.
    """
    out = {}
    prefix = f"{source}: " + (f"[{where}] " if where else "")
    for key, value in table.items():
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (known keys: {', '.join(schema)})"
            raise SwiftSVDError(f"{prefix}unknown key {key!r}{hint}")
        converted = _coerce(value, schema[key], source.parent)
        if converted is None:
            raise SwiftSVDError(f"{prefix}{key}: expected {describe(schema[key])}, "
                                f"got {_toml_type(value)} {value!r}")
        out[key] = converted
    for key in required:
        if key not in out:
            raise SwiftSVDError(f"{prefix}missing key {key!r} ({describe(schema[key])})")
    return out
