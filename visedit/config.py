"""Config dataclasses share two rules: unknown keys are an error that lists the valid ones, and a ``float``
setting given as an int or a numeric string (YAML reads ``1e-3`` as a string) is read as a float."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C", bound="StrictConfig")


class StrictConfig:
    """Mixin for frozen config dataclasses: ``from_dict`` rejects unknown keys with a clear message."""

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}")
        floats = {f.name for f in dataclasses.fields(cls) if f.type in ("float", float)}
        values = dict(d)
        for key in floats & set(values):
            value = values[key]
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ValueError(f"{cls.__name__}.{key} must be a number, got {value!r}") from None
        return cls(**values)
