"""Fast tests of the pure parts: batch framing, key cache, file key store, server import hygiene."""

from __future__ import annotations

import ast
import hashlib
import os
import re
from pathlib import Path

import pytest

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.runners.key_cache import AGING_LOOKUPS, KeyCache
from fhe_bento.runners.key_store import FileKeyStore

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


def _is_client(module: str) -> bool:
    return module == "fhe_bento.client" or module.startswith("fhe_bento.client.")


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
                names += ["client package"] if _is_client(node.module or "") else []
            elif isinstance(node, ast.Import):
                names = ["client package" for alias in node.names if _is_client(alias.name)]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            offenders += [
                f"{path.name}:{node.lineno} {n}" for n in names if n in DECRYPTING_NAMES | {"client package"}
            ]
    assert not offenders


def test_registry_expires_unused_keys_and_abandoned_uploads(tmp_path):
    import os
    import time

    from fhe_bento.core.settings import Settings
    from fhe_bento.runners.key_registry import KeyRegistry

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


def test_readme_lists_exactly_the_error_codes_the_server_sends():
    from fhe_bento.protocol.errors import ERROR_CODES

    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for status, codes in re.findall(r"^\| (\d{3}) \| ([^|]+) \|", section, re.M):
        documented.update(dict.fromkeys(re.findall(r"`([a-z_]+)`", codes), int(status)))
    assert documented == ERROR_CODES
    raised = set()
    for path in [*ROOT.glob("service/*.py"), *ROOT.glob("runners/*.py")]:
        raised |= set(re.findall(r"(?:FHEBentoError|_refused)\(\s*\"([a-z_]+)\"", path.read_text()))
    assert raised <= ERROR_CODES.keys(), raised - ERROR_CODES.keys()
    assert len(raised) > 20  # the pattern still finds the raise sites


def test_request_limits_answer_431_and_504_in_the_error_shape():
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from fhe_bento.service.limits import RequestLimits

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


def _registry(root: Path, **settings):
    from fhe_bento.core.settings import Settings
    from fhe_bento.runners.key_registry import KeyRegistry

    store = FileKeyStore(root)
    return store, KeyRegistry(store, Settings(**settings))


def _id(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


OTHER_SCOPE = "b" * 64


def test_unfinished_uploads_count_toward_the_store_quota(tmp_path):
    store, registry = _registry(tmp_path / "store", max_store_bytes=40, max_part_bytes=10)
    source = tmp_path / "k"
    source.write_bytes(b"k" * 10)
    assert registry.put(SCOPE, _id("stored"), source, {"model": "m"})
    for key, index in (("a", 0), ("a", 1), ("b", 0)):
        registry.put_part(SCOPE, _id(key), index, b"p" * 10, model="m", key_bytes=25)
    with pytest.raises(FHEBentoError) as full:  # 10 bytes of keys + 30 of parts: the quota is used up
        registry.put_part(SCOPE, _id("b"), 1, b"p", model="m", key_bytes=25)
    assert (full.value.status, full.value.code) == (413, "key_store_full")
    assert "10 bytes of keys and 30 bytes of unfinished uploads" in full.value.message
    registry.put_part(SCOPE, _id("a"), 1, b"q" * 10, model="m", key_bytes=25)  # a resent part replaces itself
    registry.put_part(
        OTHER_SCOPE, _id("a"), 0, b"p" * 10, model="m", key_bytes=25
    )  # another scope has its own

    # Completing "a": its own 20 bytes of parts become the key and are not counted twice.
    source.write_bytes(b"a" * 20)
    assert registry.put(SCOPE, _id("a"), source, {"model": "m"})
    store.drop_parts(SCOPE, _id("a"))
    source.write_bytes(b"c")
    with pytest.raises(FHEBentoError) as full:
        registry.put(SCOPE, _id("c"), source, {"model": "m"})
    assert full.value.code == "key_store_full"
    assert "30 bytes of keys and 10 bytes of unfinished uploads" in full.value.message


def test_part_index_and_upload_bytes_are_bounded_by_the_model_key(tmp_path):
    store, registry = _registry(tmp_path / "store", max_part_bytes=10)
    assert [registry.max_parts(k) for k in (1, 10, 11, 25, 30, 31)] == [1, 1, 2, 3, 3, 4]
    key = _id("k")
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
        registry.put_part(scope, _id(key), index, b"p", model="m", key_bytes=100)

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
    store.drop_parts(SCOPE, _id("b"))  # completed: its slot is free
    put(SCOPE, "c")
    assert set(store.open_uploads()) == {(SCOPE, _id("a")), (SCOPE, _id("c")), (OTHER_SCOPE, _id("a"))}
    assert store.open_uploads()[(SCOPE, _id("a"))].parts == {0: 1, 1: 1}


def test_an_expired_upload_frees_its_slot_before_the_check(tmp_path):
    import os
    import time

    store, registry = _registry(tmp_path / "store", max_open_uploads_per_scope=1, upload_ttl_seconds=60)
    registry.put_part(SCOPE, _id("old"), 0, b"p", model="m", key_bytes=100)
    registry.sweep(force=True)  # the periodic sweep just ran: the part check alone must drop the old upload
    with pytest.raises(FHEBentoError):
        registry.put_part(SCOPE, _id("new"), 0, b"p", model="m", key_bytes=100)
    an_hour_ago = time.time() - 3600
    for part in (store.root / SCOPE / "uploads" / _id("old")).iterdir():
        os.utime(part, (an_hour_ago, an_hour_ago))
    registry.put_part(SCOPE, _id("new"), 0, b"p", model="m", key_bytes=100)
    assert set(store.open_uploads()) == {(SCOPE, _id("new"))}


def test_staging_cleanup_removes_only_old_spool_files(tmp_path):
    import os
    import time

    from fhe_bento.core.settings import Settings

    settings = Settings(staging_dir=tmp_path / "staging", request_timeout=10)
    staging = settings.staging_path()
    old = time.time() - 3600
    for name in ("upload-crashed", "assembled-crashed", "notes.txt"):
        (staging / name).write_bytes(b"x")
        os.utime(staging / name, (old, old))
    (staging / "upload-being-written").write_bytes(b"x")  # another HTTP worker's, right now
    assert staging.clear_stale(settings) == 2
    assert sorted(p.name for p in staging.iterdir()) == ["notes.txt", "upload-being-written"]


def test_s3_store_counts_and_bounds_uploads_like_the_file_store(moto_url, tmp_path):
    import boto3

    from fhe_bento.core.settings import Settings
    from fhe_bento.runners.key_registry import KeyRegistry
    from fhe_bento.runners.s3_key_store import S3KeyStore

    boto3.client("s3").create_bucket(Bucket="fhe-bento-units")
    store = S3KeyStore("fhe-bento-units", f"units-{tmp_path.name}")
    registry = KeyRegistry(
        store, Settings(max_store_bytes=40, max_part_bytes=10, max_open_uploads_per_scope=2)
    )
    for key, index in (("a", 0), ("a", 1), ("b", 0)):
        registry.put_part(SCOPE, _id(key), index, b"p" * 10, model="m", key_bytes=25)
    uploads = store.open_uploads()
    assert {name: held.parts for name, held in uploads.items()} == {
        (SCOPE, _id("a")): {0: 10, 1: 10},
        (SCOPE, _id("b")): {0: 10},
    }
    assert all(held.last_part > 0 for held in uploads.values())
    with pytest.raises(FHEBentoError) as many:
        registry.put_part(SCOPE, _id("c"), 0, b"p", model="m", key_bytes=25)
    assert many.value.code == "too_many_uploads"
    source = tmp_path / "k"
    source.write_bytes(b"k" * 20)
    with pytest.raises(FHEBentoError) as full:  # 30 bytes of parts + 20 of a new key
        registry.put(SCOPE, _id("other"), source, {"model": "m"})
    assert "0 bytes of keys and 30 bytes of unfinished uploads" in full.value.message
    assert registry.put(SCOPE, _id("a"), source, {"model": "m"})  # a's own parts become the key
    store.drop_parts(SCOPE, _id("a"))
    registry.put_part(SCOPE, _id("b"), 1, b"p" * 10, model="m", key_bytes=25)  # 20 + 20: resumes to the quota
    with pytest.raises(FHEBentoError) as full:
        registry.put_part(SCOPE, _id("b"), 2, b"p", model="m", key_bytes=25)
    assert "20 bytes of keys and 20 bytes of unfinished uploads" in full.value.message


@pytest.mark.parametrize(
    ("predict", "admin", "variable"),
    [
        (" , ", "", "FHE_BENTO_PREDICT_TOKENS"),
        ("tok-p1,,tok-p2", "tok-admin", "FHE_BENTO_PREDICT_TOKENS"),
        ("tok-p1, ", "tok-admin", "FHE_BENTO_PREDICT_TOKENS"),
        ("", " , ", "FHE_BENTO_ADMIN_TOKENS"),
        ("", "tok-admin,", "FHE_BENTO_ADMIN_TOKENS"),
        ("tok-p1", "", "FHE_BENTO_ADMIN_TOKENS"),  # predict tokens need an admin token
        ("tok-p1", "  ", "FHE_BENTO_ADMIN_TOKENS"),
    ],
)
def test_token_settings_that_could_turn_auth_off_are_refused(predict, admin, variable):
    from fhe_bento.service.auth import TokenSettingsError, parse_token_settings

    with pytest.raises(TokenSettingsError, match=variable) as refused:
        parse_token_settings(predict, admin)
    assert "tok-" not in str(refused.value)  # the message never shows a token


def test_token_settings_accepted_forms():
    from fhe_bento.service.auth import parse_token_settings

    assert not parse_token_settings("", "").enabled and not parse_token_settings("  ", " ").enabled
    auth = parse_token_settings(" tok-p1 , tok-p2 ", "tok-admin")
    assert not auth.caller("Bearer tok-p2", need_admin=False).admin
    assert auth.caller("Bearer tok-admin", need_admin=True).admin
    assert (
        parse_token_settings("", "tok-admin").caller("Bearer tok-admin", need_admin=True).admin
    )  # admin only


def test_bad_token_settings_stop_the_service_at_import():
    import os
    import subprocess
    import sys

    env = {**os.environ, "FHE_BENTO_PREDICT_TOKENS": "tok-p1,,tok-p2", "FHE_BENTO_ADMIN_TOKENS": "tok-admin"}
    done = subprocess.run(
        [sys.executable, "-c", "import fhe_bento.service.auth"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "TokenSettingsError: FHE_BENTO_PREDICT_TOKENS" in done.stderr
    assert "tok-" not in done.stderr


class _DevFolderTransport:
    """Just what a RemoteModel needs to start, from a FHEModelDev folder, and a predict_batch that answers
    `refusals` times with a 503 of `code` (Retry-After: 7) before it answers."""

    def __init__(self, dev_dir: Path) -> None:
        self.zip = (dev_dir / "client.zip").read_bytes()

    def info(self, name: str) -> dict:
        return {
            "name": name,
            "client_sha256": hashlib.sha256(self.zip).hexdigest(),
            "needs_key": False,
            "n_features": 30,
            "n_outputs": 2,
        }

    def get_model(self, name: str) -> dict:
        return self.info(name)

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        return self.zip, ""


def test_decrypting_without_the_private_key_is_refused_not_garbage(demo, tmp_path):
    """An answer decrypted in a process with an empty key cache would otherwise get fresh keys, and noise."""
    from conftest import LOGREG

    from fhe_bento.client import FHEClient, FHEServiceError

    owner = FHEClient(
        transport=_DevFolderTransport(demo.dev_dirs[LOGREG]), cache_dir=tmp_path / "owner", progress=False
    ).model(LOGREG)
    row = owner.encrypt(demo.x_test[:1])[0]
    stranger = FHEClient(
        transport=_DevFolderTransport(demo.dev_dirs[LOGREG]), cache_dir=tmp_path / "stranger", progress=False
    ).model(LOGREG)
    with pytest.raises(FHEServiceError) as refused:
        stranger.decrypt(row)
    assert refused.value.code == "no_private_key"  # (a new client on the owner's cache loads its key:
    # tests/test_aws.py decrypts a transform job's answers in another process than the one that encrypted)


def test_client_key_cache_is_private_whatever_the_umask(demo, tmp_path):
    import os
    import stat

    from conftest import LOGREG, XGB

    from fhe_bento.client import FHEClient

    cache = tmp_path / "made" / "cache"  # the client creates both folders
    old_umask = os.umask(0o022)
    try:
        client = FHEClient(transport=_DevFolderTransport(demo.dev_dirs[XGB]), cache_dir=cache, progress=False)
        assert client.model(XGB).evaluation_key()
        plain = FHEClient(
            transport=_DevFolderTransport(demo.dev_dirs[LOGREG]), cache_dir=cache, progress=False
        )
        assert plain.model(LOGREG).encrypt(demo.x_test[:1])  # keygen through encryption alone
    finally:
        os.umask(old_umask)
    folders = [tmp_path / "made", *(p for p in [cache, *cache.rglob("*")] if p.is_dir())]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(folders) >= 6 and any(p.parent.name == "keys" for p in cache.rglob("*"))
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {
        str(p): "0o700" for p in folders
    }
    assert files and {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        str(p): "0o600" for p in files
    }


@pytest.mark.parametrize("code", ["overloaded", "runner_unavailable"])
@pytest.mark.parametrize("transport", ["http", "sagemaker"])
def test_client_retries_a_busy_or_restarting_server_after_retry_after(
    demo, tmp_path, monkeypatch, code, transport
):
    import json
    from types import SimpleNamespace

    import httpx
    from conftest import LOGREG

    from fhe_bento.client import FHEClient, api
    from fhe_bento.client.http_transport import FHEServiceError, HTTPTransport
    from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
    from fhe_bento.protocol.names import ATTRIBUTES_HEADER

    dev = _DevFolderTransport(demo.dev_dirs[LOGREG])
    refusals = {"left": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        op = dict(f.strip().split("=", 1) for f in request.headers.get(ATTRIBUTES_HEADER, "").split(";") if f)
        op = op.get("op") or request.url.path.rsplit("/", 1)[-1]
        if op == "list_models":
            return httpx.Response(200, json=[dev.info(LOGREG)])
        if op == LOGREG:
            return httpx.Response(200, json=dev.info(LOGREG))
        if op in ("client.zip", "get_client"):
            return httpx.Response(200, content=dev.zip)
        assert op == "predict_batch", op
        if refusals["left"]:
            refusals["left"] -= 1
            body = json.dumps({"error": {"code": code, "message": "busy"}})
            return httpx.Response(503, content=body, headers={"Retry-After": "7"})
        return httpx.Response(200, content=wire.encode_batch([b"answer"]))

    http = httpx.Client(base_url="http://fhe.test", transport=httpx.MockTransport(handler))
    if transport == "http":
        chosen = HTTPTransport("http://fhe.test", client=http)
    else:
        invoker = LocalInvoker("http://fhe.test")
        invoker.http.close()
        invoker.http = http
        chosen = SageMakerTransport(invoker)
    sleeps: list[float] = []
    monkeypatch.setattr(api, "time", SimpleNamespace(sleep=sleeps.append))
    model = FHEClient(transport=chosen, cache_dir=tmp_path, progress=False, max_retries=3).model(LOGREG)

    refusals["left"] = 3  # as many as max_retries: the last attempt answers
    assert model._run_batch([b"row"]) == [b"answer"]
    assert len(sleeps) == 3 and all(7 <= s <= 7 * 1.5 for s in sleeps)

    sleeps.clear()
    refusals["left"] = 4  # one more than max_retries: the error reaches the caller
    with pytest.raises(FHEServiceError) as refused:
        model._run_batch([b"row"])
    assert refused.value.code == code and refused.value.status == 503 and len(sleeps) == 3


def test_session_answers_round_trip_and_sessions_can_be_turned_off():
    from fhe_bento.protocol.sessions import NEW_SESSION, parse_session
    from fhe_bento.service.sessions import session_for

    key_id = "ab" * 32
    session = session_for(NEW_SESSION, key_id, 600)
    assert parse_session(session.header()) == session and not session.expired(margin_seconds=500)
    assert session_for(session.id, key_id, 600) is None  # carried, still open: nothing new to answer
    assert session_for(NEW_SESSION, key_id, 0) is None and session_for(None, None, 600) is None
    for answer in ("", "id", "id; Expires=tomorrow", "a b; Expires=2026-01-01T00:00:00Z"):
        with pytest.raises(ValueError):
            parse_session(answer)


def test_a_client_stops_asking_for_sessions_when_the_endpoint_opens_none():
    import httpx

    from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
    from fhe_bento.protocol.sessions import SESSION_HEADER

    asked = []

    def handler(request: httpx.Request) -> httpx.Response:  # an endpoint with FHE_BENTO_SESSION_SECONDS=0
        asked.append(request.headers.get(SESSION_HEADER))
        return httpx.Response(200, content=wire.encode_batch([b"answer"]))

    invoker = LocalInvoker("http://fhe.test")
    invoker.http.close()
    invoker.http = httpx.Client(base_url="http://fhe.test", transport=httpx.MockTransport(handler))
    transport = SageMakerTransport(invoker)
    for _ in range(2):
        assert transport.predict_batch("model", "ab" * 32, [b"row"]) == [b"answer"]
    assert asked == ["NEW_SESSION", None] and not transport.sessions


def test_client_never_reuses_a_connection_the_server_may_be_closing():
    """A server closes an idle keep-alive connection after its timeout (uvicorn under `bentoml serve`: 5 s),
    and a request sent just as it does is lost ("Server disconnected without sending a response"). This
    server drops any request that arrives on a connection idle for 1.5 s, without answering: the client's
    pool must have let such a connection go (KEEPALIVE_SECONDS) and opened a new one."""
    import socketserver
    import threading
    import time

    from fhe_bento.client.http_transport import KEEPALIVE_SECONDS, HTTPTransport

    server_idle = 1.5
    assert server_idle > KEEPALIVE_SECONDS
    connections = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            connections.append(self)
            answered = None
            while self.rfile.readline():  # a request line
                while self.rfile.readline() not in (b"\r\n", b""):  # headers; the requests carry no body
                    pass
                if answered is not None and time.monotonic() - answered > server_idle:
                    return  # closed as the request crossed: no answer
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]"
                )
                answered = time.monotonic()

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        transport = HTTPTransport(f"http://127.0.0.1:{server.server_address[1]}", timeout=10)
        assert transport.list_models() == []
        time.sleep(server_idle + 0.5)
        assert transport.list_models() == []  # on a new connection
        assert len(connections) == 2
        transport.close()
        server.shutdown()


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    from harness.session_dir import PREFIX, remove_abandoned

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    abandoned, running, other = (
        tmp_path / f"{PREFIX}{gone.stdout.strip()}",
        tmp_path / f"{PREFIX}{os.getpid()}",
        tmp_path / f"{PREFIX}notapid",
    )
    for path in (abandoned, running, other):
        (path / "client-venv").mkdir(parents=True)
    assert remove_abandoned(tmp_path) == [abandoned]
    assert not abandoned.exists() and running.exists() and other.exists()
