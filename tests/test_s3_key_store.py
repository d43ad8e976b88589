"""The `s3://` key store on moto's server: the same counts and bounds as the file store."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol.keys import key_id

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_s3_store_counts_and_bounds_uploads_like_the_file_store(moto_url, tmp_path):
    import boto3

    from fhe_bento.keys.registry import KeyRegistry
    from fhe_bento.keys.s3_store import S3KeyStore
    from fhe_bento.runtime.settings import Settings

    boto3.client("s3").create_bucket(Bucket="fhe-bento-units")
    store = S3KeyStore("fhe-bento-units", f"units-{tmp_path.name}")
    registry = KeyRegistry(
        store, Settings(max_store_bytes=40, max_part_bytes=10, max_open_uploads_per_scope=2)
    )
    for key, index in (("a", 0), ("a", 1), ("b", 0)):
        registry.put_part(SCOPE, key_id(key.encode()), index, b"p" * 10, model="m", key_bytes=25)
    uploads = store.open_uploads()
    assert {name: held.parts for name, held in uploads.items()} == {
        (SCOPE, key_id(b"a")): {0: 10, 1: 10},
        (SCOPE, key_id(b"b")): {0: 10},
    }
    assert all(held.last_part > 0 for held in uploads.values())
    with pytest.raises(FHEBentoError) as many:
        registry.put_part(SCOPE, key_id(b"c"), 0, b"p", model="m", key_bytes=25)
    assert many.value.code == "too_many_uploads"
    source = tmp_path / "k"
    source.write_bytes(b"k" * 20)
    with pytest.raises(FHEBentoError) as full:  # 30 bytes of parts + 20 of a new key
        registry.put(SCOPE, key_id(b"other"), source, {"model": "m"})
    assert "0 bytes of keys and 30 bytes of unfinished uploads" in full.value.message
    assert registry.put(SCOPE, key_id(b"a"), source, {"model": "m"})  # a's own parts become the key
    store.drop_parts(SCOPE, key_id(b"a"))
    registry.put_part(
        SCOPE, key_id(b"b"), 1, b"p" * 10, model="m", key_bytes=25
    )  # 20 + 20: resumes to the quota
    with pytest.raises(FHEBentoError) as full:
        registry.put_part(SCOPE, key_id(b"b"), 2, b"p", model="m", key_bytes=25)
    assert "20 bytes of keys and 20 bytes of unfinished uploads" in full.value.message
