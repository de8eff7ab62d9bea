"""Named registries: one per concept (data sources, evaluation tasks, pretrained weights).

The library registers its own entries where it defines them; a project registers its entries in
its package, which its gin files import (a gin ``import my_project`` line), so a name is known
before any config that uses it is built and an unknown name fails at start, naming the
registered ones. Names are registered once: a second registration under the same name is an
error, not a silent override.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """``registry.register(name, entry)`` or ``@registry.register(name)``; ``registry[name]``."""

    def __init__(self, concept: str):
        self.concept = concept
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry: Entry | None = None):
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.concept} names are non-empty strings, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.concept} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise KeyError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: str) -> str:
        """The message for an unregistered ``name``."""
        return (
            f"unknown {self.concept} {name!r}; registered: {sorted(self._entries)} (a project's entries are "
            "registered by the package its gin file imports)"
        )

    def check(self, names, where: str) -> None:
        """Raises ValueError naming ``where`` if any of ``names`` is not registered."""
        missing = sorted(set(names) - set(self._entries))
        if missing:
            raise ValueError(f"{where}: {self.unknown(missing[0])}")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, name: str, default=None):
        return self._entries.get(name, default)
