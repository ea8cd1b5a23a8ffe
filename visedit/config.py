"""Config dataclasses share one rule: unknown keys are an error that lists the valid ones."""

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
        return cls(**d)
