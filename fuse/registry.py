"""Registries of interchangeable algorithms (merge methods, fusion functions, aligners): one place for the
duplicate-name check and for the "unknown name; known: …" error."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """A name -> entry mapping that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str, error: type[Exception] = ValueError, key: str | None = None):
        super().__init__()
        self.kind, self.error, self.key = kind, error, key

    def add(self, name: str, entry: T) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = entry

    def lookup(self, name: str) -> T:
        if name not in self:
            prefix = f"{self.key}: " if self.key else ""
            raise self.error(f"{prefix}unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
