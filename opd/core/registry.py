"""A tiny name -> function registry for the algorithm's families (strategies, weightings, estimators, policy losses).

Why: launchers and YAML pass names as strings; a registry turns a typo into an error that lists the valid names,
and a duplicate registration (two plugins fighting over a name) into an error instead of a silent override. The
registries are the only list of valid names: `OPDConfig` validates against them, so a plugin's entry (see
`opd.core.plugins`) is selectable by name from YAML or an environment variable without editing the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}") from None

    def names(self) -> list[str]:
        """In registration order: the built-ins first, in the order their module documents them."""
        return list(self._entries)
