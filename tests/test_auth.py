"""Bearer tokens, in process: the service's app built with predict and admin tokens (as
FHE_BENTO_PREDICT_TOKENS and FHE_BENTO_ADMIN_TOKENS make it) around the session's in-process runner.
Every route called with no token, a wrong token, a predict token and an admin token gets the documented
answer, keys are scoped to the token that uploaded them, and no token reaches the log."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
from conftest import LOGREG, XGB, assert_error, serve_in_process
from fastapi.testclient import TestClient

from fhe_bento.client import FHEClient
from fhe_bento.client.answers import FHEServiceError
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER
from fhe_bento.service.auth import TokenAuth

ALICE, BOB, ADMIN = "alice-predict-token", "bob-predict-token", "the-admin-token"
KEY_ID = "cd" * 32
TRAINING_ID = "ab" * 16


@pytest.fixture(scope="module")
def secured(in_process):
    from pydantic import SecretStr

    from fhe_bento.service.app import build_app
    from fhe_bento.service.settings import ServiceSettings

    settings = ServiceSettings(predict_tokens=SecretStr(f"{ALICE}, {BOB}"), admin_tokens=SecretStr(ADMIN))
    with serve_in_process(build_app(settings), in_process) as client:
        yield client


def refused(code: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value("fhe_bento_auth_refused_total", {"code": code}) or 0.0


def as_caller(http: TestClient, token: str, cache_dir: Path) -> FHEClient:
    """A data owner with this token, speaking to the in-process app."""
    client = TestClient(http.app, base_url=str(http.base_url), headers=bearer(token))
    return FHEClient(
        transport=HTTPTransport(str(http.base_url), client=client), cache_dir=cache_dir, progress=False
    )


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def routes(logreg_ct: bytes) -> list[tuple[str, str, dict]]:
    """(method, path, request options) of every route the service owns, with a body valid enough that a
    caller with the right token gets past validation."""
    octet = {"Content-Type": "application/octet-stream"}
    form = {"files": {"model_input": ("x.bin", b"x")}, "data": {"uid": KEY_ID}}
    keys = f"/v1/models/{XGB}/keys"
    trainings = f"/v1/models/{LOGREG}/trainings"  # an inference model: 400 not_training_model past auth
    batch = {"content": wire.encode_batch([logreg_ct]), "headers": {"Content-Type": wire.CONTENT_TYPE}}
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
        ("POST", f"{trainings}", batch),
        ("POST", f"{trainings}/{TRAINING_ID}/steps?step=0", batch),
        ("POST", f"{trainings}/{TRAINING_ID}/epochs?step=0", batch),
        ("GET", f"{trainings}/{TRAINING_ID}/weights", {}),
        ("GET", f"{trainings}/{TRAINING_ID}", {}),
        ("DELETE", f"{trainings}/{TRAINING_ID}", {}),
    ]


# What a predict token gets on each route above: the route's own answer, not an auth error (/compute's
# key is looked up before its one-byte model_input is looked at: 404 unknown_key).
PREDICT_ANSWERS = [
    200,
    200,
    200,
    400,
    404,
    404,
    200,
    200,
    400,
    200,
    200,
    200,
    400,
    404,
    200,
    400,
    400,
    400,
    400,
    400,
    400,
]
ADMIN_ROUTES = [("GET", "/v1/keys"), ("DELETE", f"/v1/keys/{'ef' * 32}/{KEY_ID}")]


@pytest.fixture(scope="module")
def logreg_ct(secured, demo, tmp_path_factory):
    return (
        as_caller(secured, ALICE, tmp_path_factory.mktemp("alice")).model(LOGREG).encrypt(demo.x_test[:1])[0]
    )


def test_auth_matrix(secured, logreg_ct):
    forbidden_before = refused("forbidden")
    for (method, path, options), answer in zip(routes(logreg_ct), PREDICT_ANSWERS, strict=True):
        for token, code in ((None, "auth_required"), ("wrong-token", "invalid_token")):
            response = secured.request(
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
            response = secured.request(
                method,
                path,
                headers={**options.get("headers", {}), **bearer(token)},
                **{k: v for k, v in options.items() if k != "headers"},
            )
            assert response.status_code == answer, (method, path, response.text[:200])
    for method, path in ADMIN_ROUTES:
        assert_error(secured.request(method, path), 401, "auth_required")
        assert_error(secured.request(method, path, headers=bearer("wrong")), 401, "invalid_token")
        assert_error(secured.request(method, path, headers=bearer(ALICE)), 403, "forbidden")
        assert secured.request(method, path, headers=bearer(ADMIN)).status_code in (200, 404)
    assert secured.get("/ping").status_code == 200  # SageMaker's health check never needs a token
    assert_error(secured.get("/v1/models", headers={"Authorization": f"Basic {ALICE}"}), 401, "invalid_token")
    assert refused("forbidden") - forbidden_before == len(ADMIN_ROUTES)


def test_keys_are_scoped_to_the_token_that_uploaded_them(secured, demo, tmp_path, caplog):
    """Bob knows Alice's key id: he can neither use, see, list nor delete her key. The admin sees and
    deletes it."""
    caplog.set_level(logging.DEBUG)
    alice = as_caller(secured, ALICE, tmp_path / "alice").model(XGB)
    key_id = alice.ensure_key()
    x = demo.x_test[:1]
    np.testing.assert_array_equal(alice.predict(x), demo.clear_predict(XGB, x))

    bob = as_caller(secured, BOB, tmp_path / "alice")  # the same private keys
    with TestClient(secured.app, base_url=str(secured.base_url), headers=bearer(BOB)) as http:
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

    with TestClient(secured.app, base_url=str(secured.base_url), headers=bearer(ADMIN)) as http:
        listed = [k for k in http.get("/v1/keys").json() if k["key_id"] == key_id]
        assert (
            len(listed) == 1
            and listed[0]["model"] == XGB
            and listed[0]["bytes"] == len(alice.evaluation_key())
        )
        assert listed[0]["owner"] and listed[0]["owner"] not in (ALICE, BOB)  # a hash, never the token
        assert http.delete(f"/v1/keys/{listed[0]['scope']}/{key_id}").status_code == 204
    with TestClient(secured.app, base_url=str(secured.base_url), headers=bearer(ALICE)) as http:
        assert http.head(f"/v1/models/{XGB}/keys/{key_id}").status_code == 404
    assert ALICE not in caplog.text and BOB not in caplog.text and ADMIN not in caplog.text
    assert {r.name for r in caplog.records if r.name.startswith("bentoml.fhe_bento")}, (
        "no product log captured"
    )


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
