"""The key store plus its policies: per-model byte limit, TTL of unused keys, bounds on chunked uploads and
expiry of abandoned ones.

Only the key service (`keys/service.py`, in the runner) and the engines that read keys use
it, and every store access goes through it. Every process asks it whether a key is registered, so a key
that expired or was deleted is gone for all of them at their next request, whichever replica they run on.

The limits are checked against what the store lists, then the write happens: there is no lock across
processes and replicas, so concurrent writes may pass a limit by what they add together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import KeyStore, Upload
from fhe_bento.protocol.keys import part_count
from fhe_bento.runtime import metrics
from fhe_bento.runtime.settings import Settings

log = logging.getLogger("bentoml.fhe_bento.keys")
MAX_SWEEP_INTERVAL = 60.0  # seconds between two sweeps of expired keys and abandoned uploads in one process
TOUCHED_MIN_BOUND = 1024  # recent key touches remembered before the old ones are forgotten


class KeyRegistry:
    def __init__(self, store: KeyStore, settings: Settings) -> None:
        self._store = store
        self.key_ttl = settings.key_ttl_seconds
        self.upload_ttl = settings.upload_ttl_seconds
        self.max_scope_bytes = settings.max_store_bytes
        self.part_bytes = settings.max_part_bytes
        self.max_open = settings.max_open_uploads
        self.max_open_per_scope = settings.max_open_uploads_per_scope
        # Rewriting "last used" on every request would cost a write per prediction: once per tenth of the TTL
        # is exact enough for expiry.
        self.touch_interval = self.key_ttl / 10
        self.sweep_interval = min(
            MAX_SWEEP_INTERVAL, self.upload_ttl / 2, (self.key_ttl or MAX_SWEEP_INTERVAL) / 2
        )
        self._touched: dict[tuple[str, str], float] = {}
        self._touched_bound = TOUCHED_MIN_BOUND
        self._last_sweep = 0.0
        self._lock = threading.Lock()

    def _expired(self, scope: str, key_id: str, now: float) -> bool:
        if not self.key_ttl:
            return False
        used = self._store.last_used(scope, key_id)
        return used is not None and now - used > self.key_ttl

    def has(self, scope: str, key_id: str) -> bool:
        """Registered and not expired. An expired key is deleted here, so every replica agrees."""
        if not self._store.has(scope, key_id):
            return False
        if self._expired(scope, key_id, time.time()):
            self._store.delete(scope, key_id)
            log.info("key expired after %ss unused: key_id=%s", self.key_ttl, key_id)
            return False
        return True

    def use(self, scope: str, key_id: str) -> bool:
        """`has`, and the key marked as used when it is there: a request's one look at its key."""
        if not self.has(scope, key_id):
            return False
        self.mark_used(scope, key_id)
        return True

    def read(self, scope: str, key_id: str) -> bytes:
        return self._store.read(scope, key_id)

    def size(self, scope: str, key_id: str) -> int:
        return self._store.size(scope, key_id)

    def delete(self, scope: str, key_id: str) -> bool:
        return self._store.delete(scope, key_id)

    def listing(self) -> list[dict]:
        """Every stored key of every model and tenant, with its stored info."""
        return [
            {"scope": scope, "key_id": key_id, **self._store.info(scope, key_id)}
            for scope, key_id in self._store.list_keys()
        ]

    def parts(self, scope: str, key_id: str) -> dict[int, int]:
        return self._store.list_parts(scope, key_id)

    def assemble_parts(self, scope: str, key_id: str, count: int) -> Iterator[bytes]:
        return self._store.assemble_parts(scope, key_id, count)

    def drop_parts(self, scope: str, key_id: str) -> None:
        self._store.drop_parts(scope, key_id)

    def mark_used(self, scope: str, key_id: str) -> None:
        if not self.key_ttl:
            return
        now = time.monotonic()
        if now - self._touched.get((scope, key_id), -self.touch_interval) >= self.touch_interval:
            self._store.touch(scope, key_id)
            self._touched[(scope, key_id)] = now
            if len(self._touched) > self._touched_bound:  # forget touches too old to matter: a bounded dict
                self._touched = {k: t for k, t in self._touched.items() if now - t < self.touch_interval}
                self._touched_bound = 2 * max(len(self._touched), TOUCHED_MIN_BOUND)

    def put(self, scope: str, key_id: str, source: Path, info: dict) -> bool:
        self.sweep()
        size = source.stat().st_size
        # The parts of this very key (a chunked upload being completed) become the key: not counted twice.
        uploads = {name: held for name, held in self._live_uploads()[0].items() if name != (scope, key_id)}
        used = self._check_quota(scope, info.get("model", ""), uploads, size)
        created = self._store.put(scope, key_id, source, info)
        metrics.STORE_BYTES.labels(model=info.get("model", "")).set(used + size if created else used)
        return created

    def max_parts(self, key_bytes: int) -> int:
        """Parts of a `key_bytes`-byte key when each but the last is FHE_BENTO_MAX_PART_BYTES long: no upload
        of that key needs more."""
        return part_count(key_bytes, self.part_bytes)

    def put_part(
        self, scope: str, key_id: str, index: int, data: bytes, *, model: str, key_bytes: int
    ) -> None:
        """Hold one part of a chunked upload of a key of `model`, whose keys are `key_bytes` long: the index
        within that key's parts, the upload's parts within its size, everything within the store quota and,
        for a new upload, within the bounds on open uploads."""
        most = self.max_parts(key_bytes)
        if not 0 <= index < most:
            raise FHEBentoError(
                "invalid_part",
                f"a key of model {model!r} is {key_bytes} bytes, at most {most} parts of "
                f"FHE_BENTO_MAX_PART_BYTES ({self.part_bytes}): the part index is in 0..{most - 1}",
            )
        self.sweep()
        uploads, _ = self._live_uploads()
        upload = uploads.get((scope, key_id))
        if upload is None:
            self._check_open(scope, model, uploads)
        replaced = upload.parts.get(index, 0) if upload else 0  # a part sent again replaces itself
        held = (upload.bytes if upload else 0) - replaced + len(data)
        if held > key_bytes:
            raise FHEBentoError(
                "payload_too_large",
                f"the parts of key {key_id} would add up to {held} bytes; "
                f"a key of model {model!r} is {key_bytes}",
            )
        self._check_quota(scope, model, uploads, len(data) - replaced)
        self._store.put_part(scope, key_id, index, data)

    def _check_quota(
        self, scope: str, model: str, uploads: dict[tuple[str, str], Upload], adding: int
    ) -> int:
        """Refuse `adding` more bytes unless they fit FHE_BENTO_MAX_STORE_BYTES beside the scope's keys and
        unfinished uploads; returns the bytes of its keys."""
        keys = self._store.scope_bytes(scope)
        parts = sum(upload.bytes for (upload_scope, _), upload in uploads.items() if upload_scope == scope)
        if keys + parts + adding > self.max_scope_bytes:
            raise FHEBentoError(
                "key_store_full",
                (
                    f"model {model!r} holds {keys} bytes of keys and {parts} bytes of unfinished uploads: "
                    f"{adding} more "
                    f"do not fit in FHE_BENTO_MAX_STORE_BYTES ({self.max_scope_bytes})"
                ),
            )
        return keys

    def _check_open(self, scope: str, model: str, uploads: dict[tuple[str, str], Upload]) -> None:
        """Refuse to open one more upload past the bounds. Parts of an upload already open are always taken
        (the caller does not come here), so that an interrupted upload can resume."""
        in_scope = sum(1 for upload_scope, _ in uploads if upload_scope == scope)
        if in_scope >= self.max_open_per_scope:
            bound = f"model {model!r} has {in_scope} unfinished key uploads (FHE_BENTO_MAX_OPEN_UPLOADS_PER_SCOPE)"
        elif len(uploads) >= self.max_open:
            bound = f"the server holds {len(uploads)} unfinished key uploads (FHE_BENTO_MAX_OPEN_UPLOADS)"
        else:
            return
        raise FHEBentoError(
            "too_many_uploads",
            (
                f"{bound}: complete one, or retry later; an unfinished upload expires {self.upload_ttl} s after its "
                f"last part (FHE_BENTO_UPLOAD_TTL_SECONDS)"
            ),
        )

    def _live_uploads(self) -> tuple[dict[tuple[str, str], Upload], int]:
        """The unfinished uploads, once those idle past the upload TTL are dropped (so that they free their
        slot and bytes now, not at the next sweep); returns (live uploads, how many were dropped)."""
        cutoff = time.time() - self.upload_ttl
        uploads = self._store.open_uploads()
        live = {name: held for name, held in uploads.items() if held.last_part >= cutoff}
        for scope, key_id in uploads.keys() - live.keys():
            self._store.drop_parts(scope, key_id)
        if len(live) < len(uploads):
            log.info("%d uploads idle for over %ss removed", len(uploads) - len(live), self.upload_ttl)
        return live, len(uploads) - len(live)

    def sweep(self, force: bool = False) -> tuple[int, int]:
        """Delete keys unused for longer than the TTL and uploads abandoned for longer than the upload TTL.
        Runs at most once per sweep interval per process unless forced (on writes: key and part uploads, which
        also drop abandoned uploads at every write). Returns (keys, uploads) removed."""
        with self._lock:
            now = time.time()
            if not force and time.monotonic() - self._last_sweep < self.sweep_interval:
                return 0, 0
            self._last_sweep = time.monotonic()
        keys = [k for k in self._store.list_keys() if self._expired(*k, now)] if self.key_ttl else []
        for scope, key_id in keys:
            self._store.delete(scope, key_id)
        if keys:
            log.info("sweep: %d keys unused for over %ss removed", len(keys), self.key_ttl)
        return len(keys), self._live_uploads()[1]
