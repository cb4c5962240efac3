"""Name -> factory registries (plain dicts) whose errors list the valid names.

Every pluggable piece (model, optimizer, scheduler, loss, task) is looked up by the
name a spec gives.  An unknown name is a user error, so the message lists every valid
choice with the closest match first.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any


def closest_first(name: str, choices: Iterable[str]) -> list[str]:
    """All ``choices`` ordered by similarity to ``name`` (closest first, ties alphabetical)."""
    choices = sorted(set(choices))
    ratio = lambda c: difflib.SequenceMatcher(None, name.lower(), c.lower()).ratio()  # noqa: E731
    return sorted(choices, key=lambda c: (-ratio(c), c))


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    return f"unknown {kind} {name!r}; valid choices (closest first): {', '.join(closest_first(name, choices))}"


class Registry(dict):
    """A dict of factories with a kind label used in error messages."""

    def __init__(self, kind: str, entries: dict[str, Callable[..., Any]] | None = None):
        super().__init__(entries or {})
        self.kind = kind

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@MODELS.register()`` adds a function under its own name."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self[key] = fn
            return fn

        return add

    def get_or_raise(self, name: str) -> Callable[..., Any]:
        if name not in self:
            raise KeyError(unknown_name_message(self.kind, name, self))
        return self[name]
