"""The request path's rules in process (the service's app, a real runner and concrete, no `bentoml serve`):
prediction routes that the framework routes on their own, and one key-id rule on every route and adapter."""

from __future__ import annotations

import pytest
from conftest import LOGREG, XGB, assert_error

from fhe_bento.client import FHEClient, RemoteModel
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, KEY_ID_HEADER, OCTET_STREAM

OCTET = {"Content-Type": OCTET_STREAM}


def _bentoml_mounted(app):
    """`app` mounted as BentoML mounts a service's ASGI app (`@bentoml.asgi_app`): its PassiveMount
    forwards a request only when one of the app's own routes matches it."""
    from _bentoml_impl.server.mount import PassiveMount
    from starlette.applications import Starlette

    return Starlette(routes=[PassiveMount("/", app)])


@pytest.fixture
def app_without_catch_all(in_process):
    """A fresh app of the service's routes but `GET /v1/models/{name:path}`, the route whose partial match on
    every prediction path used to be what let predictions through BentoML's mount."""
    from fastapi import APIRouter

    from fhe_bento.service.app import ROUTERS, build_app
    from fhe_bento.service.operations import current_operations
    from fhe_bento.service.routes import router as native_router
    from fhe_bento.service.settings import ServiceSettings

    trimmed = APIRouter()
    trimmed.routes.extend(r for r in native_router.routes if r.path != "/v1/models/{name:path}")
    assert len(trimmed.routes) == len(native_router.routes) - 1
    app = build_app(ServiceSettings(), [trimmed if r is native_router else r for r in ROUTERS])
    app.dependency_overrides[current_operations] = lambda: in_process
    return app


def test_predictions_are_routes_of_their_own_under_bentomls_mount(app_without_catch_all, demo, tmp_path):
    from concrete.ml.deployment import FHEModelClient
    from fastapi.testclient import TestClient

    fhe = FHEModelClient(str(demo.dev_dirs[LOGREG]), key_dir=str(tmp_path))
    fhe.generate_private_and_evaluation_keys()
    x = demo.x_test[:3]
    rows = [fhe.quantize_encrypt_serialize(x[i : i + 1]) for i in range(len(x))]
    with TestClient(_bentoml_mounted(app_without_catch_all)) as http:
        one = http.post(f"/v1/models/{LOGREG}/predict", content=rows[0], headers=OCTET)
        assert one.status_code == 200, one.text
        batch = http.post(
            f"/v1/models/{LOGREG}/predict_batch",
            content=wire.encode_batch(rows),
            headers={"Content-Type": wire.CONTENT_TYPE},
        )
        assert batch.status_code == 200, batch.text
        answers = [one.content, *wire.decode_batch(batch.content, 3)[1:]]
        labels = [int(fhe.deserialize_decrypt_dequantize(a).argmax()) for a in answers]
        assert labels == list(demo.clear_predict(LOGREG, x))
        # errors of these routes are the app's JSON errors, not the mount's plain-text 404
        assert_error(http.post("/v1/models/nope/predict", content=b"x", headers=OCTET), 404, "unknown_model")
        # and the removed route is really gone: BentoML's mount does not forward what no route matches
        assert http.get(f"/v1/models/{LOGREG}").status_code == 404


@pytest.fixture(scope="module")
def xgb_owner(in_process, tmp_path_factory):
    """An XGB data owner of the in-process app, its key registered; yields (http client, owner, key id)."""
    from conftest import serve_in_process

    from fhe_bento.service.app import app

    with serve_in_process(app, in_process) as http:
        owner: RemoteModel = FHEClient(
            transport=HTTPTransport("http://testserver", client=http),
            cache_dir=tmp_path_factory.mktemp("xgb-owner"),
            progress=False,
            concurrency=1,
        ).model(XGB)
        key_id = owner.ensure_key()
        assert key_id is not None
        yield http, owner, key_id


def test_an_uppercase_key_id_is_the_same_key_on_every_route_and_adapter(xgb_owner, demo):
    http, owner, key_id = xgb_owner
    upper = key_id.upper()
    base = f"/v1/models/{XGB}/keys/{upper}"
    assert http.head(base).status_code == 200
    parts = http.get(f"{base}/parts")
    assert parts.status_code == 200 and parts.json()["key_id"] == key_id
    row = owner.encrypt(demo.x_test[:1])[0]
    native = http.post(f"/v1/models/{XGB}/predict", content=row, headers={**OCTET, KEY_ID_HEADER: upper})
    assert native.status_code == 200, native.text
    assert (
        owner.labels(owner.decrypt(native.content).reshape(1, -1))[0]
        == demo.clear_predict(XGB, demo.x_test[:1])[0]
    )
    sagemaker = http.post(
        "/invocations", content=b"{}", headers={ATTRIBUTES_HEADER: f"op=has_key; model={XGB}; key={upper}"}
    )
    assert sagemaker.status_code == 200 and sagemaker.json() == {"key_id": key_id, "registered": True}
    # Zama's client sends the uid that /add_key answered; any case names the same key (XGB is the default)
    zama = http.post("/compute", files={"model_input": ("x", row)}, data={"uid": upper})
    assert zama.status_code == 200, zama.text


@pytest.mark.parametrize("suffix", ["%0A", "%20", "%0D%0A", "0"])
def test_a_key_id_with_anything_around_it_is_malformed_on_every_route(xgb_owner, suffix):
    http, _, key_id = xgb_owner
    bad = f"{key_id}{suffix}"
    base = f"/v1/models/{XGB}/keys/{bad}"
    head = http.head(base)
    assert head.status_code == 400 and head.content == b""
    assert_error(http.delete(base), 400, "invalid_key_id")
    assert_error(http.get(f"{base}/parts"), 400, "invalid_key_id")
    assert_error(http.post(f"{base}/complete", params={"parts": 1}), 400, "invalid_key_id")
    assert http.head(f"/v1/models/{XGB}/keys/{key_id}").status_code == 200  # nothing was deleted
