"""A bounded memo for per-process results keyed by a model and its shapes."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any


class FifoCache:
    """A dict that forgets its oldest entry once it holds ``size`` entries.

    natgrad_jax memoises results that depend only on a model and the shapes it is called
    with (the capture of a network's layers, the independent-examples check, K-FAC's view
    of a leaf), so that a training loop pays for them once per shapes, and a process that
    sees many models does not keep them all.

    Example:
      >>> cache = FifoCache(size=2)
      >>> [cache.get(k, lambda k=k: k * k) for k in (1, 2, 1, 3)]
      [1, 4, 1, 9]
      >>> 1 in cache, 3 in cache
      (False, True)
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: dict = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __getitem__(self, key: Hashable) -> Any:
        return self._entries[key]

    def put(self, key: Hashable, value: Any) -> None:
        if key not in self._entries and len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = value

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value stored under ``key``, computed by ``compute()`` and stored if absent."""
        if key not in self._entries:
            self.put(key, compute())
        return self._entries[key]
