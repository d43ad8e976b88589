"""`/invocations` operations against a real `bentoml serve`, sent exactly as SageMaker forwards them."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from conftest import LOGREG, REAL_XGB_CIPHERTEXT, XGB, real_body

from fhe_bento.client import FHEClient, FHEServiceError
from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER


@pytest.fixture(scope="module")
def fresh_xgb(server, tmp_path_factory):
    """An XGB model handle with a key the server has never seen, talking only /invocations."""
    transport = SageMakerTransport(LocalInvoker(server.url))
    client = FHEClient(transport=transport, cache_dir=tmp_path_factory.mktemp("sm-client"), progress=False)
    return client.model(XGB)


def invoke(server, attributes: str, body: bytes = b"{}", content_type: str = "application/octet-stream"):
    return httpx.post(
        f"{server.url}/invocations",
        content=body,
        timeout=300,
        headers={"Content-Type": content_type, ATTRIBUTES_HEADER: attributes},
    )


def test_list_models_and_client_zip(server):
    transport = SageMakerTransport(LocalInvoker(server.url))
    names = {m["name"]: m for m in transport.list_models()}
    assert set(names) == {XGB, LOGREG}
    data, _ = transport.get_client_zip(LOGREG)
    assert hashlib.sha256(data).hexdigest() == names[LOGREG]["client_sha256"]


def test_key_in_parts_is_resumable_and_verified(server, fresh_xgb, demo):
    key = fresh_xgb.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    transport = fresh_xgb.transport
    part = 5 * 1024 * 1024
    count = -(-len(key) // part)
    assert count > 1 and not transport.has_key(XGB, key_id)

    # A corrupted part is caught when the parts are joined, and the upload starts over.
    for index in range(count):
        chunk = key[index * part : (index + 1) * part]
        if index == 1:
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        assert (
            invoke(server, f"op=put_key_part; model={XGB}; key={key_id}; part={index}", chunk).status_code
            == 200
        )
    bad = invoke(server, f"op=complete_key; model={XGB}; key={key_id}; parts={count}")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "digest_mismatch"
    assert json.loads(invoke(server, f"op=key_parts; model={XGB}; key={key_id}").content)["parts"] == []

    # Half the parts arrive, then the client resumes: it sends only what is missing.
    for index in range(0, count, 2):
        invoke(
            server,
            f"op=put_key_part; model={XGB}; key={key_id}; part={index}",
            key[index * part : (index + 1) * part],
        )
    early = invoke(server, f"op=complete_key; model={XGB}; key={key_id}; parts={count}")
    assert early.status_code == 400 and early.json()["error"]["code"] == "missing_parts"
    assert not transport.has_key(XGB, key_id)  # no partial key is ever visible
    held = json.loads(invoke(server, f"op=key_parts; model={XGB}; key={key_id}").content)["parts"]
    assert held == list(range(0, count, 2))
    sent_before = server.metric("bentoml_service_request_total", endpoint="/invocations")
    assert fresh_xgb.ensure_key() == key_id
    sent = server.metric("bentoml_service_request_total", endpoint="/invocations") - sent_before
    assert sent == 3 + (count - len(held))  # has_key + key_parts + missing parts + complete_key
    assert transport.has_key(XGB, key_id)

    row = demo.x_test[60:61]
    assert fresh_xgb.predict(row)[0] == demo.clear_predict(XGB, row)[0]


def test_envelope_with_inline_key(server, demo, tmp_path):
    """The async-inference body: a one-off job carrying its key inline, answered in batch framing."""
    remote = FHEClient(server.url, cache_dir=tmp_path, progress=False).model(LOGREG)
    rows = demo.x_test[:6]
    key = remote.evaluation_key()
    envelope = wire.encode_envelope(remote.encrypt(rows), LOGREG, hashlib.sha256(key).hexdigest(), key)
    for attributes in ("op=envelope", ""):  # an envelope is recognised without attributes too
        answer = invoke(server, attributes, envelope, wire.ENVELOPE_CONTENT_TYPE)
        assert answer.status_code == 200, answer.text
        results = wire.decode_batch(answer.content, max_rows=len(rows))
        labels = [int(remote.fhe.deserialize_decrypt_dequantize(r).argmax()) for r in results]
        assert labels == list(demo.clear_predict(LOGREG, rows))


@pytest.mark.parametrize(
    ("attributes", "body", "status", "code"),
    [
        ("op=explode", b"x", 400, "invalid_attributes"),
        ("op", b"x", 400, "invalid_attributes"),
        ("op=predict; model=nope", b"x", 404, "unknown_model"),
        (f"op=has_key; model={XGB}", b"{}", 400, "invalid_attributes"),
        (f"op=put_key_part; model={XGB}; key={'0' * 64}; part=x", b"x", 400, "invalid_attributes"),
        (f"op=put_key_part; model={XGB}; key={'0' * 64}; part=99999", b"x", 400, "invalid_part"),
        (f"op=predict; model={XGB}; key={'0' * 64}", REAL_XGB_CIPHERTEXT, 404, "unknown_key"),
        (f"op=predict; model={LOGREG}", b"garbage", 400, "invalid_ciphertext"),
        ("op=envelope", b"not an envelope", 400, "invalid_envelope"),
        ("x" * 1100, b"x", 400, "invalid_attributes"),
    ],
)
def test_bad_invocations(server, demo, tmp_path, attributes, body, status, code):
    response = invoke(server, attributes, real_body(body, demo, tmp_path))
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_transport_raises_service_errors(server):
    transport = SageMakerTransport(LocalInvoker(server.url))
    with pytest.raises(FHEServiceError) as err:
        transport.get_model("nope")
    assert err.value.status == 404 and err.value.code == "unknown_model"
