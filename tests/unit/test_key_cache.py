"""The engines' warm-key cache: TinyLFU admission under the access patterns that matter."""

from __future__ import annotations

from pathlib import Path

from fhe_bento.keys.cache import AGING_LOOKUPS, KeyCache

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def _round_robin_hits(cache: KeyCache, keys: int, rounds: int) -> int:
    hits = 0
    for _ in range(rounds):
        for name in range(keys):
            hits += cache.get_or_load(("s", name), lambda: (object(), 10))[1]
    return hits


def test_key_cache_keeps_a_stable_set_warm_under_round_robin():
    """Round robin over 6 keys with room for 4: LRU evicts each key just before it comes back and never
    hits; the cache keeps 4 warm and misses only (K - C) / K of the time after the first round."""
    cache = KeyCache(capacity_bytes=40)
    rounds = 50
    hits = _round_robin_hits(cache, keys=6, rounds=rounds)
    assert hits >= 4 * (rounds - 1), hits
    assert cache.used_bytes <= 40


def test_key_cache_admits_a_key_asked_for_more_than_the_coldest():
    cache = KeyCache(capacity_bytes=20)
    _round_robin_hits(cache, keys=2, rounds=3)  # two keys warm, asked for three times each
    for _ in range(5):  # up to one lookup more than the warm keys: loaded each time, not admitted
        assert cache.get_or_load(("s", "new"), lambda: ("N", 10)) == ("N", False)
    # The fifth lookup was clearly more than the warm keys' three: admitted then, a hit now.
    assert cache.get_or_load(("s", "new"), lambda: ("X", 10)) == ("N", True) and cache.used_bytes == 20


def test_key_cache_counts_age_so_old_favourites_give_way():
    cache = KeyCache(capacity_bytes=10)
    for _ in range(100):
        cache.get_or_load(("s", "old"), lambda: ("O", 10))
    for _ in range(AGING_LOOKUPS * 3):  # today's key, every time: the old one's count halves each window
        cache.get_or_load(("s", "new"), lambda: ("N", 10))
    assert cache.get(("s", "new")) == "N" and cache.get(("s", "old")) is None


def test_key_cache_never_holds_a_key_larger_than_its_bound_or_a_discarded_one():
    cache = KeyCache(capacity_bytes=100)
    assert cache.get_or_load(("s", "huge"), lambda: ("H", 101)) == ("H", False)
    assert cache.get(("s", "huge")) is None and cache.used_bytes == 0
    cache.get_or_load(("s", "a"), lambda: ("A", 40))
    cache.discard(("s", "a"))
    assert cache.get(("s", "a")) is None and cache.used_bytes == 0
