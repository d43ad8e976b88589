"""Model versions side by side, in process (the service's app around a real runner and concrete): requests
name `name:version`, a bare name gets the default, the default and retirements are shared state in the key
store, and the Python client follows a retirement by itself (docs/http-api.md, "Model versions")."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import assert_error, served_app

from fhe_bento.client import FHEClient
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.protocol import wire

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def served(logreg_versions, tmp_path_factory):
    """An app serving both versions (the newer, configured last, is the default), with a key store of its
    own; yields (http client, settings)."""
    import os

    from fhe_bento.service.settings import ServiceSettings

    store = tmp_path_factory.mktemp("version-keys")
    saved = {k: os.environ.get(k) for k in ("FHE_BENTO_MODELS", "FHE_BENTO_KEY_STORE")}
    os.environ["FHE_BENTO_MODELS"] = ",".join(logreg_versions.tags)
    os.environ["FHE_BENTO_KEY_STORE"] = store.as_uri()
    try:
        settings = ServiceSettings()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with served_app(settings) as (http, ops):
        yield http, settings, ops.specs


@pytest.fixture(autouse=True)
def as_configured(served, logreg_versions):
    """Each test starts as the server does: the newest version the default, none retired (setting a
    default takes it out of the retired ones)."""
    http, _, _ = served
    for tag in logreg_versions.tags:
        name, version = tag.split(":")
        assert http.put(f"/v1/models/{name}/default", json={"version": version}).status_code == 200
    yield


def _rows(versions, tag, cache, x):
    """Ciphertexts of `x` under the keys of `tag`'s client specs, and that client (to decrypt)."""
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(str(versions.dev_dirs[tag]), key_dir=str(cache / tag.replace(":", "-")))
    client.generate_private_and_evaluation_keys()
    return [client.quantize_encrypt_serialize(x[i : i + 1]) for i in range(len(x))], client


def test_both_versions_serve_side_by_side_and_the_bare_name_gets_the_default(
    served, logreg_versions, demo, tmp_path
):
    http, _, _ = served
    name, (v1, v2) = logreg_versions.name, logreg_versions.tags
    info = http.get(f"/v1/models/{name}").json()
    assert info["default_version"] == info["version"] == v2.split(":")[1]
    assert set(info["versions"]) == {v1.split(":")[1], v2.split(":")[1]}
    shas = {facts["client_sha256"] for facts in info["versions"].values()}
    assert len(shas) == 2  # retrained: other client specs, other keys
    x = demo.x_test[:3]
    for tag in (v1, v2):
        rows, client = _rows(logreg_versions, tag, tmp_path, x)
        answer = http.post(
            f"/v1/models/{tag}/predict_batch",
            content=wire.encode_batch(rows),
            headers={"Content-Type": wire.CONTENT_TYPE},
        )
        assert answer.status_code == 200, answer.text
        got = [
            int(np.argmax(client.deserialize_decrypt_dequantize(a)))
            for a in wire.decode_batch(answer.content, 3)
        ]
        assert got == list(logreg_versions.models[tag].predict(x, fhe="disable"))
    # a bare name is the default's: v2's ciphertexts, not v1's
    rows_v1, _ = _rows(logreg_versions, v1, tmp_path, x[:1])
    assert_error(
        http.post(f"/v1/models/{name}/predict", content=rows_v1[0], headers=OCTET), 422, "ciphertext_mismatch"
    )
    assert_error(http.get(f"/v1/models/{name}:nope"), 404, "unknown_model")


def test_default_and_retirement_are_admin_state_kept_in_the_key_store(
    served, logreg_versions, demo, tmp_path
):
    from fhe_bento.keys.store_url import open_store
    from fhe_bento.service.versions import VersionBook

    http, settings, specs = served
    name, (v1, v2) = logreg_versions.name, logreg_versions.tags
    version1, version2 = v1.split(":")[1], v2.split(":")[1]
    first = http.put(f"/v1/models/{name}/default", json={"version": version1})
    assert first.status_code == 200 and first.json()["default"] == version1
    again = http.put(f"/v1/models/{name}/default", json={"version": version1})
    assert again.json() == first.json()  # applied once: a retry changes nothing, not even the revision
    assert http.get(f"/v1/models/{name}").json()["default_version"] == version1
    assert_error(http.post(f"/v1/models/{name}/versions/{version1}/retire"), 409, "version_conflict")
    retired = http.post(f"/v1/models/{name}/versions/{version2}/retire")
    assert retired.status_code == 200 and retired.json()["retired"] == [version2]
    rows, _ = _rows(logreg_versions, v2, tmp_path, demo.x_test[:1])
    gone = http.post(f"/v1/models/{v2}/predict", content=rows[0], headers=OCTET)
    assert_error(gone, 410, "version_retired")
    assert version1 in gone.json()["error"]["message"] and gone.headers["x-fhe-current-version"] == version1
    # another replica (a new book over the same store) sees the same state
    book = VersionBook(specs, open_store(settings.key_store_url()), refresh_seconds=0)
    assert book.default_version(name) == version1 and book.state(name).retired == [version2]
    # setting a default brings a retired version back
    assert http.put(f"/v1/models/{name}/default", json={"version": version2}).json()["retired"] == []


def test_the_client_keeps_its_version_then_follows_a_retirement_with_one_rekey(
    served, logreg_versions, demo, tmp_path, caplog
):
    http, _, _ = served
    name, (v1, v2) = logreg_versions.name, logreg_versions.tags
    version1, version2 = v1.split(":")[1], v2.split(":")[1]
    transport = HTTPTransport("http://testserver", client=http)
    x = demo.x_test[:4]
    assert transport.set_default_version(name, version1)["default"] == version1
    model = FHEClient(transport=transport, cache_dir=tmp_path, progress=False, batch_size=2).model(name)
    assert model.pin.tag == v1
    assert list(model.predict(x)) == list(logreg_versions.models[v1].predict(x, fhe="disable"))
    transport.set_default_version(name, version2)
    assert list(model.predict(x)) == list(
        logreg_versions.models[v1].predict(x, fhe="disable")
    )  # still pinned
    transport.retire_version(name, version1)
    with caplog.at_level(logging.WARNING, logger="fhe_bento.client"):
        got = model.predict(x)
    assert list(got) == list(logreg_versions.models[v2].predict(x, fhe="disable"))
    assert model.pin.tag == v2
    assert [r.getMessage() for r in caplog.records if "is retired" in r.getMessage()] == [
        f"model {name}: version {v1} is retired; now on {v2} (new client specs and keys, uploaded once)"
    ]
