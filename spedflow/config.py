"""Parameters: one frozen dataclass per stage, gathered in a :class:`RunConfig`.

Every stage module defines its own ``*Params`` dataclass next to the code that uses
it; this module only gathers them, validates them, and converts to and from TOML
(``tomllib``: parsed as data, never executed). Unknown keys are an error that names
the key, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .errors import ParameterError

#: A calibration as text (``--scan-step``, ``scan_step=`` of ingest / from_array): a
#: number, then its units (a letter first, or 1/) after a space, a colon or nothing:
#: "3.03 nm", "3.03:nm", "3.03nm", "0.032:1/A".
CALIBRATION_TEXT = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*:?\s*"
                              r"((?:[^\W\d_]|1/)\S*)?\s*")

__all__ = ["params_from_dict", "params_to_dict", "check_range"]


def check_range(name: str, value, *, low=None, high=None, low_open=False,
                high_open=False, allow_none=False, integer=False):
    """Validate one scalar parameter; raise ParameterError naming it.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``.
    """
    if value is None:
        if allow_none:
            return
        raise ParameterError(f"`{name}` must be given (got None)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(f"`{name}` must be a number (got {value!r})")
    if integer and int(value) != value:
        raise ParameterError(f"`{name}` must be a whole number (got {value!r})")
    if value != value:  # NaN
        raise ParameterError(f"`{name}` must be a number (got NaN)")
    if value in (math.inf, -math.inf):
        raise ParameterError(f"`{name}` must be finite (got {value!r})")
    if low is not None and (value < low or (low_open and value == low)):
        rel = ">" if low_open else ">="
        raise ParameterError(f"`{name}` must be {rel} {low} (got {value!r})")
    if high is not None and (value > high or (high_open and value == high)):
        rel = "<" if high_open else "<="
        raise ParameterError(f"`{name}` must be {rel} {high} (got {value!r})")


def check_auto_switch(name: str, value) -> None:
    """Validate a switch that is true, false or "auto" (resolved from the data)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ParameterError(f"`{name}` must be true, false or \"auto\" (got {value!r})")


def params_to_dict(params) -> dict:
    """A nested plain dict (TOML/JSON-able) of a params dataclass; None omitted."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        if dataclasses.is_dataclass(v):
            v = params_to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        if v is not None:
            out[f.name] = v
    return out


def params_from_dict(cls, data: Mapping[str, Any] | None, *, where: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys.

    Nested dataclass fields are built recursively. Values are type-checked
    loosely (int where float is expected is accepted); the dataclass'
    ``__post_init__`` does the range checks.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"[{where}] " if where else ""
        # a workflow's configuration holds sections (each a dataclass), a section parameters
        kind = ("section" if fields and all(_dataclass_type(cls, f) is not None
                                            for f in fields.values()) else "parameter")
        name = unknown[0]
        if kind == "section" and not isinstance(data[name], Mapping):  # `key = value` on top
            owners = [f.name for f in fields.values()
                      if name in {g.name for g in dataclasses.fields(_dataclass_type(cls, f))}]
            where_it = (f"it is a parameter of {', '.join(f'[{o}]' for o in owners)}"
                        if owners else f"the sections are {', '.join(sorted(fields))}")
            raise ParameterError(f"{prefix}`{name}` lies outside any [section]; {where_it}")
        raise ParameterError(
            f"{prefix}unknown {kind} {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        sub = _dataclass_type(cls, f)
        if sub is not None:
            if not isinstance(value, Mapping):
                raise ParameterError(f"`{name}` must be a table of parameters (got {value!r})")
            value = params_from_dict(sub, value, where=f"{where}.{name}" if where else name)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong kinds of values inside the dataclass
        raise ParameterError(f"[{where}] {exc}" if where else str(exc)) from None
    except ParameterError as exc:  # a range check: name the section it is in
        text = str(exc)
        if where and not text.startswith("["):
            raise ParameterError(f"[{where}] {text}") from None
        raise


def _dataclass_type(cls, field):
    import typing
    hints = typing.get_type_hints(cls)
    t = hints.get(field.name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file as data only; one-line errors for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise ParameterError(f"config file {str(p)!r} does not exist")
    try:
        # a byte-order mark (Windows editors write one) is no TOML, and no content either
        return tomllib.loads(p.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ParameterError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ParameterError(f"config file {str(p)!r} is not a text (TOML) file") from None


def to_toml(data: Mapping[str, Any]) -> str:
    """Write a nested dict of scalars/lists as TOML (tables for nested dicts)."""
    lines: list[str] = []

    def scalar(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} to TOML")

    def table(prefix, d):
        plain = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        nested = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        if prefix and plain:
            lines.append(f"[{prefix}]")
        for k, v in plain.items():
            lines.append(f"{k} = {scalar(v)}")
        if plain:
            lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", dict(data))
    return "\n".join(lines).rstrip() + "\n"
