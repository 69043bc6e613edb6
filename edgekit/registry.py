"""One registry table per concept (models, steps, formats, runtimes, devices)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

from .errors import EdgekitError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table with helpful errors for unknown names."""

    def __init__(self, kind: str, loader: Optional[Callable[[], None]] = None):
        """``loader`` imports the modules that fill the table, on the first lookup (so listing names stays cheap)."""
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def add(self, name: str, entry: T) -> T:
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[key] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise EdgekitError(
                f"Unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} "
                f"Known: {', '.join(sorted(self._entries))}."
            ) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._entries))

    def items(self):
        self._load()
        return sorted(self._entries.items())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)
