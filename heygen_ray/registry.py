"""Name -> builder registries for models, tasks, losses and schedules.

YAML names registry keys, never import paths. A registry is a plain dict with a decorator and an
error that lists what exists (with a close-match suggestion) when a name is unknown.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message lists the close matches and what exists."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of builders (callables or classes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable[[T], T]:
        """Decorator: `@MODELS.register("vit_b16")` (defaults to the object's __name__)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._entries and not overwrite and self._entries[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries)) or '(none)'}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Callable] = Registry("model")
TASKS: Registry[Callable] = Registry("task")
LOSSES: Registry[Callable] = Registry("loss")
SCHEDULES: Registry[Callable] = Registry("schedule")
