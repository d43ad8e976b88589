"""A per-worker LRU of deserialized evaluation keys, bounded by the keys' serialized size.

Deserializing a 60-80 MB key costs 200-350 ms; a warm key costs a dict lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable


class KeyCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def get(self, key: tuple[str, str]) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: tuple[str, str], value: Any, nbytes: int) -> None:
        if nbytes > self.capacity_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.capacity_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted

    def discard(self, key: tuple[str, str]) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def get_or_load(self, key: tuple[str, str], load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """The cached value and whether it was a hit; `load` runs outside the lock."""
        value = self.get(key)
        if value is not None:
            return value, True
        value, nbytes = load()
        self.put(key, value, nbytes)
        return value, False
