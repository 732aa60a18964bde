"""Rebuild (nested) config dataclasses from plain dicts, e.g. hyper-parameters read back from a checkpoint."""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: T | dict[str, Any] | None) -> T:
    """`cls(**data)` with nested dataclass fields rebuilt too; unknown keys raise a KeyError naming them.

    An instance is deep-copied, so that a shared default (e.g. a signature default) is never mutated through it."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return copy.deepcopy(data)
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict or {cls.__name__} for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    return cls(**{key: _convert(hints[key], value) for key, value in data.items()})


def _convert(hint: Any, value: Any) -> Any:
    if isinstance(value, dict):
        for candidate in _dataclass_options(hint):
            return from_dict(candidate, value)
    if isinstance(value, list) and typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def _dataclass_options(hint: Any) -> list[type]:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [o for o in options if dataclasses.is_dataclass(o)]


def parsed_values(namespace: Any) -> dict[str, Any]:
    """A jsonargparse namespace as a dict, without the ``__path__`` entries it adds to a group read from its own
    file (``--model model.yaml``): they are not options, and :func:`from_dict` refuses unknown keys."""
    return _without_file_paths(namespace.as_dict())


def _without_file_paths(values: Any) -> Any:
    if isinstance(values, dict):
        return {key: _without_file_paths(value) for key, value in values.items() if key != "__path__"}
    return values
