"""The key store plus its policies: per-model byte limit, TTL of unused keys, expiry of abandoned uploads.

Every process (HTTP service and runner workers) asks a `KeyRegistry` whether a key is registered, so a
key that expired or was deleted is gone for all of them at their next request, whichever replica they run
on. Plain reads, deletes and upload parts go to `registry.store` directly.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from runners import metrics
from runners.errors import FHEBentoError
from runners.key_store import KeyStore
from runners.settings import Settings

log = logging.getLogger("bentoml.fhe_bento.keys")
MAX_SWEEP_INTERVAL = 60.0  # seconds between two sweeps of expired keys and abandoned uploads in one process


class KeyRegistry:
    def __init__(self, store: KeyStore, settings: Settings) -> None:
        self.store = store
        self.key_ttl = settings.key_ttl_seconds
        self.upload_ttl = settings.upload_ttl_seconds
        self.max_scope_bytes = settings.max_store_bytes
        # Rewriting "last used" on every request would cost a write per prediction: once per tenth of the TTL
        # is exact enough for expiry.
        self.touch_interval = self.key_ttl / 10
        self.sweep_interval = min(MAX_SWEEP_INTERVAL, self.upload_ttl / 2, (self.key_ttl or MAX_SWEEP_INTERVAL) / 2)
        self._touched: dict[tuple[str, str], float] = {}
        self._last_sweep = 0.0
        self._lock = threading.Lock()

    def _expired(self, scope: str, key_id: str, now: float) -> bool:
        if not self.key_ttl:
            return False
        used = self.store.last_used(scope, key_id)
        return used is not None and now - used > self.key_ttl

    def has(self, scope: str, key_id: str) -> bool:
        """Registered and not expired. An expired key is deleted here, so every replica agrees."""
        if not self.store.has(scope, key_id):
            return False
        if self._expired(scope, key_id, time.time()):
            self.store.delete(scope, key_id)
            log.info("key expired after %ss unused: key_id=%s", self.key_ttl, key_id)
            return False
        return True

    def mark_used(self, scope: str, key_id: str) -> None:
        if not self.key_ttl:
            return
        now = time.monotonic()
        if now - self._touched.get((scope, key_id), -self.touch_interval) >= self.touch_interval:
            self.store.touch(scope, key_id)
            self._touched[(scope, key_id)] = now

    def put(self, scope: str, key_id: str, source: Path, info: dict) -> bool:
        self.sweep()
        used = self.store.scope_bytes(scope)
        size = source.stat().st_size
        if used + size > self.max_scope_bytes:
            raise FHEBentoError(
                413, "key_store_full",
                f"model {info.get('model')!r} has {used} bytes of keys; FHE_BENTO_MAX_STORE_BYTES is {self.max_scope_bytes}",
            )
        created = self.store.put(scope, key_id, source, info)
        metrics.STORE_BYTES.labels(model=info.get("model", "")).set(used + size if created else used)
        return created

    def sweep(self, force: bool = False) -> tuple[int, int]:
        """Delete keys unused for longer than the TTL and uploads abandoned for longer than the upload TTL.
        Runs at most once per sweep interval per process unless forced (on writes: key and part uploads). Returns (keys, uploads) removed."""
        with self._lock:
            now = time.time()
            if not force and time.monotonic() - self._last_sweep < self.sweep_interval:
                return 0, 0
            self._last_sweep = time.monotonic()
        keys = [k for k in self.store.list_keys() if self._expired(*k, now)] if self.key_ttl else []
        for scope, key_id in keys:
            self.store.delete(scope, key_id)
        uploads = list(self.store.stale_uploads(now - self.upload_ttl))
        for scope, key_id in uploads:
            self.store.drop_parts(scope, key_id)
        if keys or uploads:
            log.info("sweep: %d expired keys and %d abandoned uploads removed", len(keys), len(uploads))
        return len(keys), len(uploads)
