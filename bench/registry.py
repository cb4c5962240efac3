"""Name -> factory registries (plain dicts) whose errors list the valid names.

Every pluggable piece (model, optimizer, scheduler, loss, task) is looked up by the
name a spec gives.  An unknown name is a user error, so the message lists every valid
choice with the closest match first.

A registry with an entry-point ``group`` (models: ``bench.models``, tasks: ``bench.tasks``) also
takes a user's own piece without editing the package: an import path ``package.module:attr``
(found from the current folder, then installed packages) or a name an installed package
declares in that entry-point group.  Both are looked up on first use and kept beside the dict (which
lists the registered names only), so ``REGISTRY[name]`` works for them everywhere (workers, summaries
and exports included).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any


def closest_first(name: str, choices: Iterable[str]) -> list[str]:
    """All ``choices`` ordered by similarity to ``name`` (closest first, ties alphabetical)."""
    choices = sorted(set(choices))
    ratio = lambda c: difflib.SequenceMatcher(None, name.lower(), c.lower()).ratio()  # noqa: E731
    return sorted(choices, key=lambda c: (-ratio(c), c))


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    return f"unknown {kind} {name!r}; valid choices (closest first): {', '.join(closest_first(name, choices))}"


class UnknownName(KeyError):
    """A name a registry cannot give: unknown, or an import path that does not import (the message says which)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


def is_import_path(name: str) -> bool:
    """``package.module:attr`` (a colon is what tells an import path from a registered name)."""
    return ":" in name


def import_object(path: str) -> Any:
    """The object an import path ``package.module:attr`` (``attr`` may be dotted) names; UnknownName saying
    what failed.  The current folder is searched first, as ``python -m`` does, also when ``bench`` was started
    through a console script."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownName(f"import path {path!r}: expected package.module:name")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the user's module failing as it is imported
        raise UnknownName(
            f"import path {path!r}: cannot import {module_name!r} ({type(e).__name__}: {e}); it is "
            f"looked up from the current folder ({cwd}) and the installed packages"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownName(
                f"import path {path!r}: module {module_name!r} ({getattr(obj, '__file__', '?')}) has no "
                f"attribute {part!r}"
            )
        obj = getattr(obj, part)
    return obj


class Registry(dict):
    """A dict of factories with a kind label used in error messages.

    ``group``: the entry-point group whose names count as registered too, and which allows import
    paths; ``adapt(obj, where)`` turns what an import path or entry point gives into an entry
    (e.g. a Task class into an instance), raising UnknownName when it does not fit.
    """

    def __init__(
        self,
        kind: str,
        entries: dict[str, Callable[..., Any]] | None = None,
        group: str | None = None,
        adapt: Callable[[Any, str], Any] | None = None,
    ):
        super().__init__(entries or {})
        self.kind = kind
        self.group = group
        self.adapt = adapt or _callable
        self.found: dict[str, Any] = {}  # import paths and entry points already looked up

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@MODELS.register()`` adds a function under its own name."""

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self[key] = fn
            return fn

        return add

    def entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The names installed packages declare in this registry's entry-point group."""
        if self.group is None:
            return {}
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every valid name: registered and declared by installed packages."""
        return sorted(set(self) | set(self.entry_points()))

    def get_or_raise(self, name: str) -> Callable[..., Any]:
        """The entry of ``name``: registered, an import path, or an entry point; UnknownName otherwise."""
        if name in self:
            return self[name]
        if name in self.found:
            return self.found[name]
        if self.group is not None:
            if is_import_path(name):
                obj = import_object(name)
                where = f"import path {name!r}"
            elif name in (eps := self.entry_points()):
                try:
                    obj = eps[name].load()
                except Exception as e:
                    raise UnknownName(
                        f"{self.kind} {name!r} (entry point {eps[name].value} of group {self.group}): "
                        f"cannot load it ({type(e).__name__}: {e})"
                    ) from None
                where = f"entry point {name!r} ({eps[name].value})"
            else:
                raise UnknownName(
                    unknown_name_message(self.kind, name, self.names())
                    + f" (or an import path package.module:name, or an entry point of group {self.group})"
                )
            self.found[name] = self.adapt(obj, where)
            return self.found[name]
        raise UnknownName(unknown_name_message(self.kind, name, self))

    def __missing__(self, name: str) -> Any:  # REGISTRY[name] finds import paths and entry points too
        return self.get_or_raise(name)


def _callable(obj: Any, where: str) -> Any:
    if not callable(obj):
        raise UnknownName(
            f"{where}: {type(obj).__name__} object is not callable (expected a factory function or class)"
        )
    return obj
