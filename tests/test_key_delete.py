"""A deleted key is gone at once (a real `bentoml serve`): the next request with it gets 404, and no engine
process keeps it warm, so the same key uploaded again is loaded cold by every engine that runs its rows."""

from __future__ import annotations

import httpx
import pytest
from conftest import XGB, assert_error

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from harness.devserver import Server

ROWS = 4


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("key-delete")
    server = Server(
        root / "server",
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest",
            "FHE_BENTO_WORKERS": "1",
            "FHE_BENTO_ROW_THREADS": "2",  # two engine processes, each with its own warm-key cache
            "FHE_BENTO_KEY_STORE": (root / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(root / "staging"),
        },
    )
    server.start()
    server.store = root / "keys"
    yield server
    server.stop()


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_a_deleted_key_leaves_every_engines_warm_cache(server, demo, tmp_path, where):
    """`here`: deleted through this server, whose engines drop it in the delete request. `elsewhere`:
    deleted from the shared store by another worker or replica; this server's engines drop it at the next
    request that names it, which gets 404."""
    from fhe_bento.keys.store import FileKeyStore

    owner = FHEClient(server.url, cache_dir=tmp_path / "owner", progress=False).model(XGB)
    key_id = owner.ensure_key()
    body = wire.encode_batch(owner.encrypt(demo.x_test[:ROWS]))
    headers = {"Content-Type": wire.CONTENT_TYPE, KEY_ID_HEADER: key_id}

    def batch() -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/models/{XGB}/predict_batch", content=body, headers=headers, timeout=120
        )

    def lookups(result: str) -> float:
        return server.metric("fhe_bento_key_cache_total", model=XGB, result=result)

    for _ in range(2):  # warm in whichever engine runs its rows
        assert batch().status_code == 200
    assert lookups("hit") > 0

    if where == "here":
        assert httpx.delete(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 204
    else:
        assert FileKeyStore(server.store).delete(owner.info["client_sha256"], key_id)
    assert_error(batch(), 404, "unknown_key")

    key = owner.evaluation_key()
    again = httpx.post(
        f"{server.url}/v1/models/{XGB}/keys", content=key, headers={"Content-Type": OCTET_STREAM}
    )
    assert again.status_code == 201, again.text  # stored anew, under the same id
    hits, misses = lookups("hit"), lookups("miss")
    answered = batch()
    assert answered.status_code == 200
    labels = [
        owner.labels(owner.decrypt(a).reshape(1, -1))[0] for a in wire.decode_batch(answered.content, ROWS)
    ]
    assert labels == list(demo.clear_predict(XGB, demo.x_test[:ROWS]))
    # No engine kept the deleted key: the first row each engine ran had to load it again (a cold load),
    # where a warm copy would have been a hit for every row.
    cold = lookups("miss") - misses
    assert 1 <= cold <= 2
    assert lookups("hit") - hits == ROWS - cold
