"""The dict / JSON round trip that the model configs (``DiTConfig``, ``VAEConfig``) share: a frozen
dataclass written as JSON with sorted keys, read back with unknown keys named in the error (a config
from another version, or a typo, must not be dropped silently)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

from qdit_jax.errors import QditError

C = TypeVar("C", bound="ConfigIO")


class ConfigIO:
    """Mixin for frozen dataclass configs: ``replace``, ``to_dict`` / ``to_json``, ``from_dict`` /
    ``from_json``. Subclasses override ``to_dict`` where a field needs a JSON form (tuples as lists)."""

    def replace(self: C, **kw: Any) -> C:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QditError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))
