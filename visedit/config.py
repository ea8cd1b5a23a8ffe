"""Config dataclasses share three rules: unknown keys are an error that lists the valid ones; a ``float``
setting given as an int or a numeric string (YAML reads ``1e-3`` as a string) is read as a float; every
other setting must already have its declared type (``steps: many`` or ``use_im: 1`` is refused)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

C = TypeVar("C", bound="StrictConfig")

#: What each simple annotation accepts, and how an error names it.
_CHECKS = {"int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
           "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
           "bool": (lambda v: isinstance(v, bool), "true or false"),
           "str": (lambda v: isinstance(v, str), "a string"),
           "None": (lambda v: v is None, "null")}


def _check_type(owner: str, key: str, annotation: str, value: Any) -> None:
    """Refuse ``value`` unless it fits ``annotation`` (a union of int/float/bool/str/None, or a tuple/list
    of ints); other annotations are left to the config's own ``__post_init__``."""
    parts = [p.strip() for p in str(annotation).split("|")]
    checks = []
    for part in parts:
        if part in _CHECKS:
            checks.append(_CHECKS[part])
        elif part.startswith(("tuple[int", "list[int")):
            checks.append((lambda v: isinstance(v, (list, tuple)) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in v), "a list of ints"))
        else:
            return
    if not any(ok(value) for ok, _ in checks):
        wanted = " or ".join(name for _, name in checks)
        raise ValueError(f"{owner}.{key} must be {wanted}, got {value!r} ({type(value).__name__})")


class StrictConfig:
    """Mixin for frozen config dataclasses: ``from_dict`` rejects unknown keys and wrong types with a clear
    message."""

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping of settings, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields), key=str)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(fields)}")
        floats = {name for name, f in fields.items() if f.type in ("float", float)}
        values = dict(d)
        for key in floats & set(values):
            value = values[key]
            if isinstance(value, (int, str)) and not isinstance(value, bool):
                try:
                    values[key] = float(value)
                except ValueError:
                    raise ValueError(f"{cls.__name__}.{key} must be a number, got {value!r}") from None
        for key, value in values.items():
            _check_type(cls.__name__, key, fields[key].type, value)
        return cls(**values)
