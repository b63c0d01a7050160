"""TOML tables checked against dataclasses: the one checker behind ``lorakit.config`` and ``lorakit.data.config``.

A value is checked against the field's type annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``,
``list[X]``, ``tuple[X, Y]``, ``dict``, ``Any``) and converted where TOML and Python differ (an integer where a
float is expected, a list where a tuple is).  Errors name where the value was (``file [section].key``) and
what was expected; a key that is not a field gets the closest valid key as a suggestion.  The error class is
the caller's (``ConfigError``, ``DatasetError``), so each names its own domain.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any

_NAMES = {bool: "bool", int: "int", float: "float", str: "str"}


def suggestion(key: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "table"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_value(value: Any, annotation: Any, where: str, error: type[Exception]) -> Any:
    """``value`` checked against ``annotation`` and converted (int → float, list → tuple); ``error(message)``
    when it does not fit."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        list_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, where, error)
            except error as e:
                if isinstance(value, list | tuple) and typing.get_origin(arg) in (list, tuple):
                    list_error = e  # a list given for "int or [w, h]": what is wrong with the list is the news
        if list_error is not None:
            raise list_error
        names = " or ".join(_name(a) for a in args if a is not type(None))
        raise error(f"{where}: expected {names}, got {value!r}")
    if origin in (list, tuple):
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if not isinstance(value, list | tuple) or (fixed and len(value) != len(args)):
            raise error(f"{where}: expected a list{f' of {len(args)} values' if fixed else ''}, got {value!r}")
        item_types = args if fixed else (args[:1] or (Any,))
        items = [check_value(v, item_types[min(i, len(item_types) - 1)], f"{where}[{i}]", error)
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise error(f"{where}: expected {_name(annotation)}, got {value!r}")
    return value


def field_types(cls: type) -> dict[str, Any]:
    """Field name → resolved type annotation of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def set_fields(obj: Any, values: dict[str, Any], where: str, error: type[Exception]) -> None:
    """Set ``values`` on the dataclass instance ``obj``, each checked against its field's type; an unknown key
    raises ``error`` naming it, with the closest field name (or the list of fields)."""
    types_ = field_types(type(obj))
    for key, value in values.items():
        if key not in types_:
            hint = suggestion(key, types_) or f" (known: {', '.join(types_)})"
            raise error(f"{where}: unknown key {key!r}{hint}")
        setattr(obj, key, check_value(value, types_[key], f"{where}.{key}", error))
