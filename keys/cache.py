"""A per-engine cache of deserialized evaluation keys, bounded by their resident cost.

Deserializing a 60-80 MB key costs 200-350 ms (and about 2 s more per request in practice); a warm key
costs a dict lookup. The policy is scan-resistant: under round robin over more keys than fit, LRU evicts
each key just before it is asked for again and misses every time. Here a key that does not fit is
admitted only if it was asked for clearly more often than every key it would evict (TinyLFU's admission
test), so a stable set stays warm and round robin over K keys with room for C misses (K - C) / K of the time. The
counts halve every `AGING_LOOKUPS` lookups, so keys that were popular once give way to today's. The bytes
it holds are the gauge `fhe_bento_key_cache_bytes`.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from fhe_bento.runtime import metrics

AGING_LOOKUPS = 256
# A newcomer must be asked for more than one lookup above its victims: in round robin, counts differ by one
# depending on where in the round they are compared, which alone would swap the warm set now and then.
ADMISSION_MARGIN = 1


class KeyCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()  # least recently used first
        self._counts: Counter[Hashable] = (
            Counter()
        )  # lookups per key, aged; bounded by AGING_LOOKUPS + entries
        self._lookups = 0
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def _count(self, key: Hashable) -> None:
        self._counts[key] += 1
        self._lookups += 1
        if self._lookups >= AGING_LOOKUPS:
            self._lookups = 0
            for name in list(self._counts):
                self._counts[name] //= 2
                if not self._counts[name] and name not in self._entries:
                    del self._counts[name]

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            self._count(key)
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Cache `value` if it fits, or if it was asked for more often than the keys it would evict.
        Returns whether it is cached."""
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            if key in self._entries:
                return True
            victims = self._victims(nbytes)
            if victims and self._counts[key] <= ADMISSION_MARGIN + max(
                self._counts[victim] for victim in victims
            ):
                return False
            for victim in victims:
                self._bytes -= self._entries.pop(victim)[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            metrics.KEY_CACHE_BYTES.set(self._bytes)
            return True

    def _victims(self, nbytes: int) -> list[Hashable]:
        """The least asked-for keys (least recently used first among equals) whose room `nbytes` needs."""
        free = self.capacity_bytes - self._bytes
        victims = []
        for victim in sorted(
            self._entries, key=self._counts.__getitem__
        ):  # sorted() is stable: LRU order kept
            if free >= nbytes:
                break
            victims.append(victim)
            free += self._entries[victim][1]
        return victims

    def discard(self, key: Hashable) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            self._counts.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]
                metrics.KEY_CACHE_BYTES.set(self._bytes)

    def get_or_load(self, key: Hashable, load: Callable[[], tuple[Any, int]]) -> tuple[Any, bool]:
        """The cached value and whether it was a hit; `load` runs outside the lock."""
        value = self.get(key)
        if value is not None:
            return value, True
        value, nbytes = load()
        self.put(key, value, nbytes)
        return value, False
