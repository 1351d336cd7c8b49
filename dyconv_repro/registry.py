"""A tiny name -> factory registry used for operators, backbones and datasets."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from dyconv_repro.errors import UnknownNameError


class Registry:
    """Maps names to factories; an unknown name raises an error that lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None):
        """Decorator: `@OPS.register("condconv")`."""

        def deco(obj):
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            doc = help or (obj.__doc__ or "").strip().splitlines()
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def add(self, name: str, obj: Callable[..., Any], help: str = "") -> None:
        self.register(name, help or None)(obj)

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a throwaway entry)."""
        self._items.pop(name, None)
        self._help.pop(name, None)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind}s: {', '.join(sorted(self._items))}"
            ) from None

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
