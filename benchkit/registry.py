"""Name → object registries, so researchers add criteria, granularities, models, datasets and timings
without touching the core (in the spirit of timm's model registry).

Each name remembers where it was registered (module and file), so that two definitions of one name —
a plugin reusing a built-in's name, or two plugins — are refused with both origins named instead of
one silently replacing the other. Names a registry does not know yet may come from an installed
package's ``benchkit.plugins`` entry point: those are loaded on the first miss (see
:mod:`benchkit.plugins`)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the allowed names."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0])


class NameClashError(ValueError):
    """A name registered twice from two places (a plugin reusing a built-in's name, or two plugins)."""


@dataclass(frozen=True)
class Origin:
    """Where a name was registered: the registering module and its file."""

    module: str
    file: str | None = None

    @property
    def builtin(self) -> bool:
        return self.module == "benchkit" or self.module.startswith("benchkit.")

    def same_source(self, other: Origin) -> bool:
        """The same code registering again (a reloaded module, a re-run notebook cell, one file imported
        under two names): not a clash."""
        if self.file and other.file:
            return self.file == other.file
        return self.module == other.module

    def __str__(self) -> str:
        kind = "built-in, " if self.builtin else ""
        return f"{kind}{self.module}" + (f" ({self.file})" if self.file and not self.builtin else "")


def _caller_origin(depth: int) -> Origin:
    frame = inspect.currentframe()
    for _ in range(depth + 1):
        frame = frame.f_back if frame is not None else None
    g = frame.f_globals if frame is not None else {}
    module = str(g.get("__name__", "?"))
    file = g.get("__file__") or getattr(sys.modules.get(module), "__file__", None)
    return Origin(module, str(file) if file else None)


class Registry(Generic[T]):
    """A named collection of factories/objects of one kind (e.g. "criterion")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origins: dict[str, Origin] = {}

    def register(self, name: str, obj: T | None = None, *, overwrite: bool = False):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        A name already registered from elsewhere is refused (:class:`NameClashError`, naming both
        origins) unless ``overwrite=True`` says the replacement is meant."""
        origin = _caller_origin(1)

        def _add(o: T) -> T:
            key = name.lower()
            old = self._origins.get(key)
            if key in self._items and not overwrite and not (old is not None and old.same_source(origin)):
                raise NameClashError(
                    f"{self.kind} {name!r} is defined twice: by {origin} and by {old}. Give yours another "
                    f"name (or pass overwrite=True to .register to replace the other on purpose)")
            self._items[key] = o
            self._origins[key] = origin
            return o

        return _add(obj) if obj is not None else _add

    def origin(self, name: str) -> Origin | None:
        """Where ``name`` was registered (None if it is not)."""
        return self._origins.get(str(name).lower())

    def _load_plugins_on_miss(self, key: str) -> bool:
        if key in self._items:
            return True
        from benchkit.plugins import load_entry_point_plugins

        load_entry_point_plugins()
        return key in self._items

    def get(self, name: str) -> T:
        key = str(name).lower()
        if not self._load_plugins_on_miss(key):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}"
                f" (or register your own {self.kind} with the registry's .register(name), in a plugin "
                "module: `plugins:` in the YAML or --plugin on the command line)"
            )
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return self._load_plugins_on_miss(str(name).lower())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        from benchkit.plugins import load_entry_point_plugins

        load_entry_point_plugins()
        return sorted(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
