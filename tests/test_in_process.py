"""Operations, routes and the typed runner boundary in process: the service's FastAPI app through
Starlette's TestClient, its operations injected (a FastAPI dependency override) around a real `Runner` in
this process, with its real engine processes and concrete (conftest's `in_process`). No `bentoml serve`,
no mocks.

These reach the branches of key uploads, `/invocations` and every runner operation directly, much faster
than through a server.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC

import numpy as np
import pytest
from conftest import LOGREG, XGB, assert_error, serve_in_process

from fhe_bento.client import FHEClient, RemoteModel
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, KEY_ID_HEADER, OCTET_STREAM, PART_BYTES

OCTET = {"Content-Type": OCTET_STREAM}


@pytest.fixture(scope="module")
def http(in_process):
    """The service's app with the session's in-process runner (its demo models, and a key store and
    staging folder of this test run alone)."""
    from fhe_bento.service.app import app

    with serve_in_process(app, in_process) as client:
        client.staging = app.state.settings.staging_path()
        yield client


def _client(http, cache_dir) -> FHEClient:
    return FHEClient(
        transport=HTTPTransport("http://testserver", client=http),
        cache_dir=cache_dir,
        progress=False,
        concurrency=1,
    )


@pytest.fixture(scope="module")
def owner(http, tmp_path_factory) -> RemoteModel:
    """An XGB data owner speaking to the in-process app; its key is made once."""
    return _client(http, tmp_path_factory.mktemp("owner")).model(XGB)


def test_keyless_model_predicts_through_native_route_and_invocations(http, demo, tmp_path):
    logreg = _client(http, tmp_path).model(LOGREG)
    x = demo.x_test[:2]
    rows = logreg.encrypt(x)
    native = http.post(f"/v1/models/{LOGREG}/predict", content=rows[0], headers=OCTET)
    assert native.status_code == 200, native.text
    batch = http.post(
        "/invocations",
        content=wire.encode_batch(rows),
        headers={"Content-Type": wire.CONTENT_TYPE, ATTRIBUTES_HEADER: f"op=predict_batch; model={LOGREG}"},
    )
    assert batch.status_code == 200, batch.text
    answers = [native.content, wire.decode_batch(batch.content, 2)[1]]
    got = [logreg.labels(logreg.decrypt(answer).reshape(1, -1))[0] for answer in answers]
    assert got == list(demo.clear_predict(LOGREG, x))


def test_invocations_read_each_body_as_its_native_route_does(http):
    # predict takes one ciphertext (octet-stream), as POST .../predict does: the batch type is refused.
    refused = http.post(
        "/invocations",
        content=b"x",
        headers={"Content-Type": wire.CONTENT_TYPE, ATTRIBUTES_HEADER: f"op=predict; model={LOGREG}"},
    )
    assert_error(refused, 415, "unsupported_media_type")
    assert_error(
        http.post("/invocations", content=b"x", headers={**OCTET, ATTRIBUTES_HEADER: "op=nope"}),
        400,
        "invalid_attributes",
    )
    big = http.post(
        "/invocations",
        content=b"x" * (PART_BYTES + 1),
        headers={**OCTET, ATTRIBUTES_HEADER: f"op=put_key_part; model={XGB}; key={'0' * 64}; part=0"},
    )
    assert_error(big, 413, "payload_too_large")
    unknown = http.post(
        "/invocations", content=b"x", headers={**OCTET, ATTRIBUTES_HEADER: "op=predict; model=nope"}
    )
    assert_error(unknown, 404, "unknown_model")


def test_whole_upload_predict_and_delete(http, demo, owner):
    key = owner.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    created = http.post(f"/v1/models/{XGB}/keys", content=key, headers=OCTET)
    assert created.status_code == 201 and created.json() == {"key_id": key_id, "bytes": len(key)}
    assert http.post(f"/v1/models/{XGB}/keys", content=key, headers=OCTET).status_code == 200
    assert [k["key_id"] for k in http.get("/v1/keys").json()] == [key_id]
    x = demo.x_test[:1]
    answer = http.post(
        f"/v1/models/{XGB}/predict", content=owner.encrypt(x)[0], headers={**OCTET, KEY_ID_HEADER: key_id}
    )
    assert answer.status_code == 200, answer.text
    assert owner.labels(owner.decrypt(answer.content).reshape(1, -1))[0] == demo.clear_predict(XGB, x)[0]
    assert http.delete(f"/v1/models/{XGB}/keys/{key_id}").status_code == 204
    assert_error(http.delete(f"/v1/models/{XGB}/keys/{key_id}"), 404, "unknown_key")
    assert http.get("/v1/keys").json() == []
    assert not list(http.staging.iterdir())


def test_part_upload_branches(http, owner):
    key = owner.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    parts = [key[i : i + PART_BYTES] for i in range(0, len(key), PART_BYTES)]
    base = f"/v1/models/{XGB}/keys/{key_id}"
    for index in reversed(range(1, len(parts))):  # any order; part 0 missing for now
        assert http.put(f"{base}/parts/{index}", content=parts[index], headers=OCTET).status_code == 200
    assert http.put(f"{base}/parts/1", content=parts[1], headers=OCTET).status_code == 200  # resent: harmless
    assert http.get(f"{base}/parts").json()["parts"] == list(range(1, len(parts)))
    assert_error(http.post(f"{base}/complete", params={"parts": len(parts)}), 400, "missing_parts")
    assert_error(http.post(f"{base}/complete", params={"parts": len(parts) + 5}), 400, "invalid_part")
    assert http.get(f"{base}/parts").json()["parts"] == list(range(1, len(parts)))  # kept for a resume
    assert http.put(f"{base}/parts/0", content=parts[0], headers=OCTET).status_code == 200
    done = http.post(f"{base}/complete", params={"parts": len(parts)})
    assert done.status_code == 201, done.text
    assert done.json() == {"key_id": key_id, "bytes": len(key)}
    again = http.post(f"{base}/complete", params={"parts": len(parts)})  # registered already
    assert again.status_code == 200 and again.json()["key_id"] == key_id
    assert http.get(f"{base}/parts").json()["parts"] == []
    assert http.head(base).status_code == 200
    assert not list(http.staging.iterdir())


def test_parts_that_do_not_hash_to_their_key_id_are_dropped(http, owner):
    key = owner.evaluation_key()
    wrong = hashlib.sha256(b"another key").hexdigest()
    base = f"/v1/models/{XGB}/keys/{wrong}"
    parts = [key[i : i + PART_BYTES] for i in range(0, len(key), PART_BYTES)]
    for index, part in enumerate(parts):
        assert http.put(f"{base}/parts/{index}", content=part, headers=OCTET).status_code == 200
    assert_error(http.post(f"{base}/complete", params={"parts": len(parts)}), 400, "digest_mismatch")
    assert http.get(f"{base}/parts").json()["parts"] == []
    assert http.head(base).status_code == 404


def test_batch_transform_answers_every_record_in_order(http, demo, tmp_path):
    from fhe_bento.protocol import transform

    params = http.get("/execution-parameters").json()
    assert params["BatchStrategy"] == "MULTI_RECORD" and params["MaxPayloadInMB"] >= 1
    logreg = _client(http, tmp_path).model(LOGREG)
    x = demo.x_test[:3]
    rows = logreg.encrypt(x)
    body = (
        b"\n".join(
            [
                transform.encode_record(rows[0], None, LOGREG),
                b'{"ciphertext": "not base64 at all!"}',
                transform.encode_record(rows[1], None, LOGREG),
                transform.encode_record(b"\x00" * 32, None, LOGREG),  # not a ciphertext of the model
                transform.encode_record(rows[2], None, "no-such-model"),
                transform.encode_record(rows[2], None, LOGREG),
            ]
        )
        + b"\n"
    )
    answer = http.post("/invocations", content=body, headers={"Content-Type": transform.CONTENT_TYPE})
    assert answer.status_code == 200, answer.text
    answers = [transform.decode_answer(line) for line in transform.lines(answer.content)]
    assert len(answers) == 6
    assert [a["code"] for a in answers if isinstance(a, dict)] == [
        "invalid_record",
        "invalid_ciphertext",
        "unknown_model",
    ]
    results = [answers[i] for i in (0, 2, 5)]
    assert [logreg.labels(logreg.decrypt(r).reshape(1, -1))[0] for r in results] == list(
        demo.clear_predict(LOGREG, x)
    )


def test_a_stateful_session_is_opened_for_one_key_and_checked(http, owner):
    from fhe_bento.protocol.sessions import NEW_SESSION, SESSION_HEADER, parse_session

    key_id = hashlib.sha256(owner.evaluation_key()).hexdigest()
    other = hashlib.sha256(b"another key").hexdigest()

    def has_key(session: str, key: str | None = key_id):
        attrs = f"op=has_key; model={XGB}" + (f"; key={key}" if key else "")
        return http.post("/invocations", headers={ATTRIBUTES_HEADER: attrs, SESSION_HEADER: session})

    opened = has_key(NEW_SESSION)
    assert opened.status_code == 200, opened.text
    session = parse_session(opened.headers[SESSION_HEADER])
    assert 1100 < session.expires.timestamp() - time.time() <= 1200  # FHE_BENTO_SESSION_SECONDS
    carried = has_key(session.id)
    assert carried.status_code == 200 and SESSION_HEADER not in carried.headers
    prefix, _expires, nonce = session.id.split(".")
    for refused in (
        has_key(session.id, other),
        has_key(f"{prefix}.{int(time.time()) - 1}.{nonce}"),
        has_key("forged"),
        has_key(NEW_SESSION, key=None),
    ):
        assert_error(refused, 400, "invalid_session")


def test_a_client_whose_session_is_refused_opens_a_new_one(http, demo, owner):
    from datetime import datetime, timedelta

    from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
    from fhe_bento.protocol.sessions import Session

    invoker = LocalInvoker("http://testserver")
    invoker.http.close()
    invoker.http = http
    transport = SageMakerTransport(invoker)
    model = FHEClient(transport=transport, cache_dir=owner.folder.parent, progress=False).model(XGB)
    key_id = model.ensure_key()
    ended = Session(
        f"{key_id[:16]}.{int(time.time()) - 5}.{'0' * 16}", datetime.now(UTC) + timedelta(hours=1)
    )
    transport.sessions[key_id] = ended  # the client thinks it open; the server knows it ended
    x = demo.x_test[:1]
    assert model.predict(x)[0] == demo.clear_predict(XGB, x)[0]
    assert transport.sessions[key_id] != ended and not transport.sessions[key_id].expired(margin_seconds=1000)


# --- the typed boundary (contract/runner_api.py) --------------------------------------------------------


def _on_app_loop(http, work, *args):
    """`await work(*args)` on the event loop that serves the app, as its routes would."""
    return http.portal.call(work, *args)


def test_each_runner_operation_takes_and_answers_its_own_types(http, in_process, demo, owner):
    from fhe_bento.contract.runner_api import (
        KeyCompletion,
        KeyFacts,
        KeyPart,
        KeyRef,
        KeyUpload,
        PartsHeld,
        PartStored,
        RowResults,
        Rows,
        ScopedKey,
    )

    runner = in_process.runner
    tag = in_process.spec(XGB).tag  # the runner knows served versions by their tag
    key = owner.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    whole, parted = (
        KeyRef(model=tag, tenant="whole", key_id=key_id),
        KeyRef(model=tag, tenant="parts", key_id=key_id),
    )

    facts = _on_app_loop(http, runner.register_key, KeyUpload(model=tag, tenant="whole", key=key))
    assert facts == KeyFacts(key_id=key_id, bytes=len(key), created=True)
    assert _on_app_loop(http, runner.has_key, whole) is True
    x = demo.x_test[:2]
    rows = Rows(
        model=tag, tenant="whole", key_id=key_id, ciphertexts=owner.encrypt(x), deadline=time.time() + 600
    )
    done = _on_app_loop(http, runner.predict, rows)
    assert isinstance(done, RowResults) and done.row_seconds > 0
    assert list(owner.labels(np.vstack([owner.decrypt(r) for r in done.results]))) == list(
        demo.clear_predict(XGB, x)
    )

    chunks = [key[i : i + PART_BYTES] for i in range(0, len(key), PART_BYTES)]
    for index, chunk in enumerate(chunks):
        stored = _on_app_loop(
            http, runner.put_key_part, KeyPart(**parted.model_dump(), index=index, data=chunk)
        )
        assert stored == PartStored(key_id=key_id, part=index, bytes=len(chunk))
    held = _on_app_loop(http, runner.key_parts, parted)
    assert held == PartsHeld(key_id=key_id, parts=list(range(len(chunks))), bytes=len(key))
    completed = _on_app_loop(
        http, runner.complete_key, KeyCompletion(**parted.model_dump(), count=len(chunks))
    )
    assert completed == KeyFacts(key_id=key_id, bytes=len(key), created=True)

    listing = _on_app_loop(http, runner.list_keys)
    owners = {k["owner"] for k in listing if k["key_id"] == key_id}  # and the anonymous owner's, if kept
    assert {"parts", "whole"} <= owners
    assert _on_app_loop(http, runner.delete_key, whole) is None
    assert _on_app_loop(http, runner.has_key, whole) is False
    (scope,) = [k["scope"] for k in listing if k["key_id"] == key_id and k["owner"] == "parts"]
    assert _on_app_loop(http, runner.delete_any_key, ScopedKey(scope=scope, key_id=key_id)) is None
    left = {k["owner"] for k in _on_app_loop(http, runner.list_keys) if k["key_id"] == key_id}
    assert not left & {"parts", "whole"}


@pytest.mark.parametrize(
    ("rows", "code"),
    [
        ({"model": "no-such-model"}, "unknown_model"),
        ({"key_id": None}, "missing_key_id"),
        ({"key_id": "not-a-key-id"}, "invalid_key_id"),
        ({"key_id": "0" * 64}, "unknown_key"),
        ({"model": LOGREG, "key_id": None}, "invalid_ciphertext"),  # a model with its key built in
    ],
)
def test_a_refusal_crosses_the_boundary_once_with_its_documented_status(http, in_process, owner, rows, code):
    """The runner raises; the standalone runner puts the error in an `Outcome` and the service's client
    raises it back (here through their JSON, as across the network); the app answers its status."""
    from fhe_bento.contract.errors import FHEBentoError
    from fhe_bento.contract.runner_api import Outcome, RowResults, Rows
    from fhe_bento.protocol.errors import ERROR_CODES

    ops = in_process
    fields = {"model": XGB, "tenant": "anyone", "key_id": "1" * 64, "ciphertexts": [b"\x00" * 64], **rows}
    name = fields["model"]  # the runner knows a served version by its tag, the routes by name
    fields["model"] = next((spec.tag for spec in ops.specs.values() if spec.name == name), name)
    call = Rows(**fields, deadline=time.time() + 60)
    with pytest.raises(FHEBentoError) as raised:
        _on_app_loop(http, ops.runner.predict, call)
    assert raised.value.code == code and raised.value.status == ERROR_CODES[code]
    sent = Outcome[RowResults].failed(raised.value).model_dump_json()
    with pytest.raises(FHEBentoError) as received:
        Outcome[RowResults].model_validate_json(sent).unwrap()
    assert (received.value.code, received.value.message) == (code, raised.value.message)

    headers = {**OCTET, **({KEY_ID_HEADER: call.key_id} if call.key_id else {})}
    answer = http.post(f"/v1/models/{name}/predict", content=call.ciphertexts[0], headers=headers)
    assert_error(answer, ERROR_CODES[code], code)


def test_a_batch_with_a_bad_key_id_is_refused_before_any_row_is_checked(http, owner):
    from fhe_bento.protocol import transform

    garbage = [b"\x00" * 64, b"not a ciphertext"]  # each would be refused as invalid_ciphertext
    for key, code, status in (("not-a-key-id", "invalid_key_id", 400), ("2" * 64, "unknown_key", 404)):
        native = http.post(
            f"/v1/models/{XGB}/predict_batch",
            content=wire.encode_batch(garbage),
            headers={"Content-Type": wire.CONTENT_TYPE, KEY_ID_HEADER: key},
        )
        assert_error(native, status, code)
        invocation = http.post(
            "/invocations",
            content=wire.encode_batch(garbage),
            headers={
                "Content-Type": wire.CONTENT_TYPE,
                ATTRIBUTES_HEADER: f"op=predict_batch; model={XGB}; key={key}",
            },
        )
        assert_error(invocation, status, code)
        records = b"".join(transform.encode_record(row, key, XGB) + b"\n" for row in garbage)
        lines = http.post("/invocations", content=records, headers={"Content-Type": transform.CONTENT_TYPE})
        assert lines.status_code == 200, lines.text
        assert [transform.decode_answer(line)["code"] for line in transform.lines(lines.content)] == [
            code
        ] * 2


def test_rows_sent_before_a_workers_engine_first_loads_wait_for_it(demo, tmp_path):
    """A server with several workers is ready once one of them answers `/ping`: the others' first rows wait
    for their own engine instead of getting 503 (after that first load, a restart answers 503 at once)."""
    import asyncio

    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.contract.runner_api import Rows
    from fhe_bento.models.repository import load_specs
    from fhe_bento.runners.runner import Runner
    from fhe_bento.runtime.settings import Settings

    settings = Settings(
        models=f"{LOGREG}:latest", key_store=(tmp_path / "keys").as_uri(), staging_dir=tmp_path / "staging"
    )
    client = FHEModelClient(str(demo.dev_dirs[LOGREG]), key_dir=str(tmp_path / "client"))
    x = demo.x_test[:1]
    specs = load_specs(settings)
    rows = Rows(
        model=next(iter(specs)),
        tenant="t",
        key_id=None,
        ciphertexts=[client.quantize_encrypt_serialize(x)],
        deadline=time.time() + 300,
    )

    async def first_rows(runner: Runner):
        assert not await runner.ready()  # its engine processes are still loading
        return await runner.predict(rows)

    runner = Runner(settings, specs)
    try:
        done = asyncio.run(first_rows(runner))
    finally:
        runner.shutdown()
    scores = client.deserialize_decrypt_dequantize(done.results[0])
    assert np.argmax(scores, axis=1)[0] == demo.clear_predict(LOGREG, x)[0]
