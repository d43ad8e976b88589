"""Fast tests of the pure parts: batch framing, key cache, file key store, server import hygiene."""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import pytest

from runners.errors import FHEBentoError
from runners.key_cache import KeyCache
from runners.key_store import FileKeyStore
from service import wire

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_batch_framing_round_trip():
    rows = [b"", b"x", bytes(range(256)) * 10]
    assert wire.decode_batch(wire.encode_batch(rows), max_rows=3) == rows


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOPE", "starts with"),
        (wire.MAGIC + b"\x00", "truncated"),
        (wire.MAGIC + b"\x00\x00\x00\x00", "at least one"),
        (wire.MAGIC + b"\x00\x00\x00\x09", "at most"),
        (wire.MAGIC + b"\x00\x00\x00\x01\x00\x00\x00\x09abc", "ends before"),
        (wire.encode_batch([b"ab"]) + b"!", "stray"),
    ],
)
def test_batch_framing_rejects(data, message):
    with pytest.raises(wire.FramingError, match=message):
        wire.decode_batch(data, max_rows=8)


def test_key_cache_evicts_least_recently_used_by_bytes():
    cache = KeyCache(capacity_bytes=100)
    cache.put(("s", "a"), "A", 40)
    cache.put(("s", "b"), "B", 40)
    assert cache.get(("s", "a")) == "A"  # a is now the most recent
    cache.put(("s", "c"), "C", 40)
    assert cache.get(("s", "b")) is None and cache.get(("s", "a")) == "A" and cache.used_bytes == 80
    cache.put(("s", "huge"), "H", 101)  # larger than the whole cache: never cached
    assert cache.get(("s", "huge")) is None
    value, hit = cache.get_or_load(("s", "d"), lambda: ("D", 10))
    assert (value, hit) == ("D", False) and cache.get_or_load(("s", "d"), lambda: ("X", 10)) == ("D", True)


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


DECRYPTING_NAMES = {"FHEModelClient", "Client", "keygen", "generate_private_and_evaluation_keys"}


@pytest.mark.parametrize("package", ["service", "runners"])
def test_server_code_never_touches_decryption(package):
    """service/ and runners/ must not name anything that can hold a private key or decrypt."""
    offenders = []
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [alias.name for alias in node.names]
                # fhe-bento's client package holds private keys and decrypts: the server never imports it.
                names += ["client package"] if (node.module or "").split(".")[0] == "client" else []
            elif isinstance(node, ast.Import):
                names = ["client package" for alias in node.names if alias.name.split(".")[0] == "client"]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n in DECRYPTING_NAMES | {"client package"}]
    assert not offenders


def test_registry_expires_unused_keys_and_abandoned_uploads(tmp_path):
    import os
    import time

    from runners.key_registry import KeyRegistry
    from runners.settings import Settings

    store = FileKeyStore(tmp_path / "store")
    registry = KeyRegistry(store, Settings(key_ttl_seconds=60, upload_ttl_seconds=60, max_store_bytes=20))
    source = tmp_path / "k"
    source.write_bytes(b"0123456789")
    old, fresh = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"fresh").hexdigest()
    assert registry.put(SCOPE, old, source, {"model": "m"}) and registry.put(SCOPE, fresh, source, {"model": "m"})
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


def test_readme_lists_exactly_the_error_codes_the_server_sends():
    from runners.errors import ERROR_CODES

    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", section, re.M):
        documented.update(dict.fromkeys(re.findall(r"`([a-z_]+)`", codes), int(status)))
    assert documented == ERROR_CODES
    helpers = {"bad_request": 400, "not_found": 404, "unprocessable": 422}
    for path in [*ROOT.glob("service/*.py"), *ROOT.glob("runners/*.py")]:
        text = path.read_text()
        for helper, code in re.findall(r"\b(bad_request|not_found|unprocessable)\(\s*\"([a-z_]+)\"", text):
            assert ERROR_CODES.get(code) == helpers[helper], (path.name, code)
        for status, code in re.findall(r"(?:FHEBentoError|_refused)\(\s*(\d{3}),\s*\"([a-z_]+)\"", text):
            assert ERROR_CODES.get(code) == int(status), (path.name, code)


def test_request_limits_answer_431_and_504_in_the_error_shape():
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.limits import RequestLimits

    async def slow(request):
        await asyncio.sleep(float(request.query_params["s"]))
        return PlainTextResponse("done")

    app = RequestLimits(Starlette(routes=[Route("/", slow)]), max_header_bytes=2048, timeout=0.5)
    with TestClient(app) as http:
        assert http.get("/?s=0").text == "done"
        late = http.get("/?s=3")
        assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout"
        big = http.get("/?s=0", headers={"X-Big": "x" * 3000})
        assert big.status_code == 431 and big.json()["error"]["code"] == "headers_too_large"
