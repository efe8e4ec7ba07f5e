"""Fill typed dataclasses from YAML/JSON dicts: unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, TypeVar

from aquila.errors import AquilaError

T = TypeVar("T")

_FLOAT_LIKE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def is_int(value: object, minimum: int | None = None) -> bool:
    """An int and not a bool (JSON/YAML `true` is an int to Python), at least `minimum` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; allow only lossless widening (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except AquilaError as e:
                errors.append(str(e))
        raise AquilaError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise AquilaError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AquilaError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AquilaError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if is_int(value):
            return value
        raise AquilaError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if is_number(value):
            return float(value)
        if isinstance(value, str) and _FLOAT_LIKE.match(value.strip()):
            # PyYAML follows YAML 1.1: `3e-4` without a dot is a string, not a float.
            raise AquilaError(
                f"{where}: {value!r} was read as a string; YAML 1.1 needs a dot in floats, write {float(value)!r}"
            )
        raise AquilaError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise AquilaError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise AquilaError(f"{where}: expected a mapping, got {value!r}")
    return value


def from_dict(
    cls: type[T], data: dict[str, Any], source: str, base: T | None = None, ignore: frozenset = frozenset()
) -> T:
    """Build `cls` from `data` (over `base` if given). `ignore` names keys accepted but not stored."""
    if not isinstance(data, dict):
        raise AquilaError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in ignore)
    if unknown:
        raise AquilaError(
            f"{source}: unknown key {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    values = {k: coerce(v, hints[k], f"{source}: key {k!r}") for k, v in data.items() if k in names}
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values)
