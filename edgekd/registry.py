"""A name → object registry with did-you-mean errors, one per extension point."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from edgekd.errors import EdgekdError, RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to registered objects for one kind of extension."""

    def __init__(self, kind: str, error: type[EdgekdError] = RecipeError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` and its ``aliases``."""

        def add(obj: T) -> T:
            if name in self._items or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return add

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; raises a clear error if unknown."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted([*self._items, *self._aliases])
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise self.error(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(known)}")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._aliases
