"""The file key store and the key registry over it: atomic, idempotent, bounded, expiring (no server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import FileKeyStore
from fhe_bento.protocol.keys import key_id
from fhe_bento.runtime import staging

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_file_store_is_atomic_idempotent_and_persistent(tmp_path):
    source = tmp_path / "upload"
    source.write_bytes(b"key bytes")
    key_id = hashlib.sha256(b"key bytes").hexdigest()
    store = FileKeyStore(tmp_path / "store")
    assert not store.has(SCOPE, key_id)
    assert store.put(SCOPE, key_id, source, {"model": "m"}) is True
    assert store.put(SCOPE, key_id, source, {"model": "m"}) is False
    reopened = FileKeyStore(tmp_path / "store")
    assert reopened.has(SCOPE, key_id) and reopened.read(SCOPE, key_id) == b"key bytes"
    assert reopened.scope_bytes(SCOPE) == len(b"key bytes")
    assert not list((tmp_path / "store").rglob(".tmp-*"))
    assert reopened.delete(SCOPE, key_id) and not reopened.has(SCOPE, key_id)


def test_file_store_refuses_path_tricks(tmp_path):
    store = FileKeyStore(tmp_path)
    with pytest.raises(FHEBentoError) as err:
        store.has(SCOPE, "../../etc/passwd")
    assert err.value.status == 400 and err.value.code == "invalid_key_id"


def test_registry_expires_unused_keys_and_abandoned_uploads(tmp_path):
    import time

    from fhe_bento.keys.registry import KeyRegistry
    from fhe_bento.runtime.settings import Settings

    store = FileKeyStore(tmp_path / "store")
    registry = KeyRegistry(store, Settings(key_ttl_seconds=60, upload_ttl_seconds=60, max_store_bytes=20))
    source = tmp_path / "k"
    source.write_bytes(b"0123456789")
    old, fresh = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"fresh").hexdigest()
    assert registry.put(SCOPE, old, source, {"model": "m"}) and registry.put(
        SCOPE, fresh, source, {"model": "m"}
    )
    with pytest.raises(FHEBentoError) as full:  # 20 bytes per model: a third 10-byte key does not fit
        registry.put(SCOPE, hashlib.sha256(b"third").hexdigest(), source, {"model": "m"})
    assert full.value.status == 413 and full.value.code == "key_store_full"
    store.put_part(SCOPE, old, 0, b"part")
    an_hour_ago = time.time() - 3600
    os.utime(store._key_path(SCOPE, old), (an_hour_ago, an_hour_ago))
    for part in (store.root / SCOPE / "uploads" / old).iterdir():
        os.utime(part, (an_hour_ago, an_hour_ago))

    assert registry.has(SCOPE, fresh) and not registry.has(SCOPE, old)  # expired on sight, and deleted
    assert not store.has(SCOPE, old)
    assert registry.sweep(force=True) == (0, 1)  # the abandoned upload goes too
    assert store.list_parts(SCOPE, old) == {}


def _registry(root: Path, **settings):
    from fhe_bento.keys.registry import KeyRegistry
    from fhe_bento.runtime.settings import Settings

    store = FileKeyStore(root)
    return store, KeyRegistry(store, Settings(**settings))


OTHER_SCOPE = "b" * 64


def test_unfinished_uploads_count_toward_the_store_quota(tmp_path):
    store, registry = _registry(tmp_path / "store", max_store_bytes=40, max_part_bytes=10)
    source = tmp_path / "k"
    source.write_bytes(b"k" * 10)
    assert registry.put(SCOPE, key_id(b"stored"), source, {"model": "m"})
    for key, index in (("a", 0), ("a", 1), ("b", 0)):
        registry.put_part(SCOPE, key_id(key.encode()), index, b"p" * 10, model="m", key_bytes=25)
    with pytest.raises(FHEBentoError) as full:  # 10 bytes of keys + 30 of parts: the quota is used up
        registry.put_part(SCOPE, key_id(b"b"), 1, b"p", model="m", key_bytes=25)
    assert (full.value.status, full.value.code) == (413, "key_store_full")
    assert "10 bytes of keys and 30 bytes of unfinished uploads" in full.value.message
    registry.put_part(
        SCOPE, key_id(b"a"), 1, b"q" * 10, model="m", key_bytes=25
    )  # a resent part replaces itself
    registry.put_part(
        OTHER_SCOPE, key_id(b"a"), 0, b"p" * 10, model="m", key_bytes=25
    )  # another scope has its own

    # Completing "a": its own 20 bytes of parts become the key and are not counted twice.
    source.write_bytes(b"a" * 20)
    assert registry.put(SCOPE, key_id(b"a"), source, {"model": "m"})
    store.drop_parts(SCOPE, key_id(b"a"))
    source.write_bytes(b"c")
    with pytest.raises(FHEBentoError) as full:
        registry.put(SCOPE, key_id(b"c"), source, {"model": "m"})
    assert full.value.code == "key_store_full"
    assert "30 bytes of keys and 10 bytes of unfinished uploads" in full.value.message


def test_part_index_and_upload_bytes_are_bounded_by_the_model_key(tmp_path):
    store, registry = _registry(tmp_path / "store", max_part_bytes=10)
    assert [registry.max_parts(k) for k in (1, 10, 11, 25, 30, 31)] == [1, 1, 2, 3, 3, 4]
    key = key_id(b"k")
    for index in (-1, 3, 1023):  # a 25-byte key has 3 parts of 10 bytes
        with pytest.raises(FHEBentoError) as bad:
            registry.put_part(SCOPE, key, index, b"p", model="m", key_bytes=25)
        assert (bad.value.status, bad.value.code) == (400, "invalid_part") and "0..2" in bad.value.message
    for index, size in ((0, 10), (1, 10), (2, 5)):
        registry.put_part(SCOPE, key, index, b"p" * size, model="m", key_bytes=25)
    with pytest.raises(FHEBentoError) as big:  # 10 + 10 + 6 bytes held for a 25-byte key
        registry.put_part(SCOPE, key, 2, b"p" * 6, model="m", key_bytes=25)
    assert (big.value.status, big.value.code) == (413, "payload_too_large")
    assert store.list_parts(SCOPE, key) == {0: 10, 1: 10, 2: 5}


def test_open_uploads_are_bounded_per_scope_and_in_total_but_resume(tmp_path):
    store, registry = _registry(
        tmp_path / "store", max_open_uploads=3, max_open_uploads_per_scope=2, max_part_bytes=10
    )

    def put(scope: str, key: str, index: int = 0) -> None:
        registry.put_part(scope, key_id(key.encode()), index, b"p", model="m", key_bytes=100)

    put(SCOPE, "a"), put(SCOPE, "b")
    with pytest.raises(FHEBentoError) as many:
        put(SCOPE, "c")
    assert (many.value.status, many.value.code) == (429, "too_many_uploads")
    assert "FHE_BENTO_MAX_OPEN_UPLOADS_PER_SCOPE" in many.value.message
    assert "expires 86400 s after its last part (FHE_BENTO_UPLOAD_TTL_SECONDS)" in many.value.message
    put(SCOPE, "a", 1), put(SCOPE, "a", 0)  # an open upload resumes at the bound, resent parts included
    put(OTHER_SCOPE, "a")
    with pytest.raises(FHEBentoError) as many:  # 3 open in the whole store
        put(OTHER_SCOPE, "b")
    assert many.value.code == "too_many_uploads" and "FHE_BENTO_MAX_OPEN_UPLOADS)" in many.value.message
    put(OTHER_SCOPE, "a", 1)
    store.drop_parts(SCOPE, key_id(b"b"))  # completed: its slot is free
    put(SCOPE, "c")
    assert set(store.open_uploads()) == {
        (SCOPE, key_id(b"a")),
        (SCOPE, key_id(b"c")),
        (OTHER_SCOPE, key_id(b"a")),
    }
    assert store.open_uploads()[(SCOPE, key_id(b"a"))].parts == {0: 1, 1: 1}


def test_an_expired_upload_frees_its_slot_before_the_check(tmp_path):
    import time

    store, registry = _registry(tmp_path / "store", max_open_uploads_per_scope=1, upload_ttl_seconds=60)
    registry.put_part(SCOPE, key_id(b"old"), 0, b"p", model="m", key_bytes=100)
    registry.sweep(force=True)  # the periodic sweep just ran: the part check alone must drop the old upload
    with pytest.raises(FHEBentoError):
        registry.put_part(SCOPE, key_id(b"new"), 0, b"p", model="m", key_bytes=100)
    an_hour_ago = time.time() - 3600
    for part in (store.root / SCOPE / "uploads" / key_id(b"old")).iterdir():
        os.utime(part, (an_hour_ago, an_hour_ago))
    registry.put_part(SCOPE, key_id(b"new"), 0, b"p", model="m", key_bytes=100)
    assert set(store.open_uploads()) == {(SCOPE, key_id(b"new"))}


def test_staging_cleanup_removes_only_old_spool_files(tmp_path):
    import time

    from fhe_bento.runtime.settings import Settings

    settings = Settings(staging_dir=tmp_path / "folder", request_timeout=10)
    folder = settings.staging_path()
    old = time.time() - 3600
    for name in ("upload-crashed", "assembled-crashed", "notes.txt"):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (old, old))
    (folder / "upload-being-written").write_bytes(b"x")  # another HTTP worker's, right now
    assert staging.clear_stale(settings) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "upload-being-written"]
