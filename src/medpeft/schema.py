"""Dataclass schemas built from plain dicts, with one-line errors naming the dotted key.

Used by the run config (``config.py``) and by every method family's config section
(``adapters/``), which is why it lives below both: neither imports the other for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable

from .errors import ConfigError


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (bool/int/float/str, lists, optionals, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(value, inner[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' must be {type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Any, prefix: str = "",
              special: dict[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """Build dataclass ``cls`` from a dict, naming the dotted key of any problem.

    ``special``: field name -> builder ``(value, dotted key) -> value`` for fields whose
    type depends on their content (the run config's ``method`` section).
    """
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{where}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = f"{prefix}." if prefix else ""
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{dotted}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{dotted}{name}"
        if name in data:
            builder = (special or {}).get(name)
            kwargs[name] = builder(data[name], key) if builder else convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{key}'")
    return cls(**kwargs)


def require(ok: bool, key: str, problem: str) -> None:
    """Raise the one-line :class:`ConfigError` ``config key 'KEY' PROBLEM`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {problem}")


def require_choice(value: Any, choices: tuple, key: str) -> None:
    require(value in choices, key, f"must be one of {', '.join(str(c).lower() for c in choices)}, got {value!r}")
