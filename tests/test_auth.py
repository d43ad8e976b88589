"""Bearer tokens against a real `bentoml serve` with FHE_BENTO_PREDICT_TOKENS and FHE_BENTO_ADMIN_TOKENS:
every route called with no token, a wrong token, a predict token and an admin token gets the documented
answer, and keys are scoped to the token that uploaded them."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from conftest import LOGREG, XGB, assert_error

from fhe_bento.client import FHEClient
from fhe_bento.client.http_transport import FHEServiceError
from fhe_bento.core.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER
from fhe_bento.service.auth import TokenAuth
from harness.devserver import Server

ALICE, BOB, ADMIN = "alice-predict-token", "bob-predict-token", "the-admin-token"
KEY_ID = "cd" * 32


@pytest.fixture(scope="module")
def secured(demo, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("secured")
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
            "FHE_BENTO_KEY_STORE": (workdir / "keys").as_uri(),
            "FHE_BENTO_PREDICT_TOKENS": f"{ALICE}, {BOB}",
            "FHE_BENTO_ADMIN_TOKENS": ADMIN,
        },
    )
    server.start()
    yield server
    server.stop()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def routes(logreg_ct: bytes) -> list[tuple[str, str, dict]]:
    """(method, path, request options) of every route the service owns, with a body valid enough that a
    caller with the right token gets past validation."""
    octet = {"Content-Type": "application/octet-stream"}
    form = {"files": {"model_input": ("x.bin", b"x")}, "data": {"uid": KEY_ID}}
    keys = f"/v1/models/{XGB}/keys"
    return [
        ("GET", "/v1/models", {}),
        ("GET", f"/v1/models/{XGB}", {}),
        ("GET", f"/v1/models/{XGB}/client.zip", {}),
        ("POST", keys, {"content": b"not a key", "headers": octet}),
        ("HEAD", f"{keys}/{KEY_ID}", {}),
        ("DELETE", f"{keys}/{KEY_ID}", {}),
        ("PUT", f"{keys}/{KEY_ID}/parts/0", {"content": b"part", "headers": octet}),
        ("GET", f"{keys}/{KEY_ID}/parts", {}),
        ("POST", f"{keys}/{KEY_ID}/complete?parts=2", {}),
        ("POST", f"/v1/models/{LOGREG}/predict", {"content": logreg_ct, "headers": octet}),
        (
            "POST",
            f"/v1/models/{LOGREG}/predict_batch",
            {"content": wire.encode_batch([logreg_ct]), "headers": {"Content-Type": wire.CONTENT_TYPE}},
        ),
        ("GET", "/get_client", {}),
        ("POST", "/add_key", {"files": {"key": ("k.bin", b"not a key")}}),
        ("POST", "/compute", form),
        ("POST", "/invocations", {"headers": {ATTRIBUTES_HEADER: "op=list_models"}}),
    ]


# What a predict token gets on each route above: the route's own answer, not an auth error (/compute's
# one-byte model_input is refused by the ciphertext check before any key lookup).
PREDICT_ANSWERS = [200, 200, 200, 400, 404, 404, 200, 200, 400, 200, 200, 200, 400, 400, 200]
ADMIN_ROUTES = [("GET", "/v1/keys"), ("DELETE", f"/v1/keys/{'ef' * 32}/{KEY_ID}")]


@pytest.fixture(scope="module")
def logreg_ct(secured, demo, tmp_path_factory):
    client = FHEClient(secured.url, cache_dir=tmp_path_factory.mktemp("alice"), progress=False, token=ALICE)
    return client.model(LOGREG).encrypt(demo.x_test[:1])[0]


def test_auth_matrix(secured, logreg_ct):
    with httpx.Client(base_url=secured.url, timeout=60) as http:
        for (method, path, options), answer in zip(routes(logreg_ct), PREDICT_ANSWERS, strict=True):
            for token, code in ((None, "auth_required"), ("wrong-token", "invalid_token")):
                response = http.request(
                    method,
                    path,
                    headers={**options.get("headers", {}), **bearer(token)},
                    **{k: v for k, v in options.items() if k != "headers"},
                )
                if method == "HEAD":
                    assert response.status_code == 401
                else:
                    assert_error(response, 401, code)
                assert response.headers["www-authenticate"].startswith("Bearer")
            for token in (ALICE, ADMIN):
                response = http.request(
                    method,
                    path,
                    headers={**options.get("headers", {}), **bearer(token)},
                    **{k: v for k, v in options.items() if k != "headers"},
                )
                assert response.status_code == answer, (method, path, response.text[:200])
        for method, path in ADMIN_ROUTES:
            assert_error(http.request(method, path), 401, "auth_required")
            assert_error(http.request(method, path, headers=bearer("wrong")), 401, "invalid_token")
            assert_error(http.request(method, path, headers=bearer(ALICE)), 403, "forbidden")
            assert http.request(method, path, headers=bearer(ADMIN)).status_code in (200, 404)
        assert http.get("/ping").status_code == 200  # SageMaker's health check never needs a token
        assert_error(
            http.get("/v1/models", headers={"Authorization": f"Basic {ALICE}"}), 401, "invalid_token"
        )
    assert secured.metric("fhe_bento_auth_refused_total", code="forbidden") == len(ADMIN_ROUTES)


def test_keys_are_scoped_to_the_token_that_uploaded_them(secured, demo, tmp_path):
    """Bob knows Alice's key id: he can neither use, see, list nor delete her key. The admin sees and
    deletes it."""
    alice = FHEClient(secured.url, cache_dir=tmp_path / "alice", progress=False, token=ALICE).model(XGB)
    key_id = alice.ensure_key()
    x = demo.x_test[:1]
    np.testing.assert_array_equal(alice.predict(x), demo.clear_predict(XGB, x))

    bob = FHEClient(secured.url, cache_dir=tmp_path / "alice", progress=False, token=BOB)  # same private keys
    with httpx.Client(base_url=secured.url, timeout=60, headers=bearer(BOB)) as http:
        assert http.head(f"/v1/models/{XGB}/keys/{key_id}").status_code == 404
        assert_error(http.delete(f"/v1/models/{XGB}/keys/{key_id}"), 404, "unknown_key")
        assert_error(
            http.post(
                f"/v1/models/{XGB}/predict",
                content=alice.encrypt(x)[0],
                headers={"Content-Type": "application/octet-stream", "X-FHE-Key-Id": key_id},
            ),
            404,
            "unknown_key",
        )
    with pytest.raises(FHEServiceError) as raised:
        bob.transport.predict_batch(XGB, key_id, alice.encrypt(x))
    assert raised.value.code == "unknown_key"

    with httpx.Client(base_url=secured.url, timeout=60, headers=bearer(ADMIN)) as http:
        listed = [k for k in http.get("/v1/keys").json() if k["key_id"] == key_id]
        assert (
            len(listed) == 1
            and listed[0]["model"] == XGB
            and listed[0]["bytes"] == len(alice.evaluation_key())
        )
        assert listed[0]["owner"] and listed[0]["owner"] not in (ALICE, BOB)  # a hash, never the token
        assert http.delete(f"/v1/keys/{listed[0]['scope']}/{key_id}").status_code == 204
    with httpx.Client(base_url=secured.url, timeout=60, headers=bearer(ALICE)) as http:
        assert http.head(f"/v1/models/{XGB}/keys/{key_id}").status_code == 404
    log = secured.log()
    assert ALICE not in log and BOB not in log and ADMIN not in log


def test_token_check_reads_every_token_and_keeps_roles_apart():
    auth = TokenAuth(["p1", "p2"], ["a1"])
    assert not auth.caller("Bearer p2", need_admin=False).admin
    assert auth.caller("Bearer a1", need_admin=True).admin
    assert auth.caller("Bearer p1", False).tenant != auth.caller("Bearer p2", False).tenant
    assert len(auth.caller("Bearer p1", False).tenant) == 32
    for header, status in (
        ("Bearer p1", 403),
        ("Bearer nope", 401),
        ("Token p1", 401),
        ("Bearer ", 401),
        (None, 401),
    ):
        with pytest.raises(FHEBentoError) as raised:
            auth.caller(header, need_admin=True)
        assert raised.value.status == status
    open_auth = TokenAuth([], [])
    assert open_auth.caller(None, need_admin=True).tenant == ""
