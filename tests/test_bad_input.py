"""Bad input gets the documented 4xx with the JSON error shape, and the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from conftest import LOGREG, XGB, assert_error

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def material(server, demo, client_cache):
    """Real ciphertexts and keys of both demo models, made by the fhe-bento client."""
    client = FHEClient(server.url, cache_dir=client_cache, progress=False)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    row = demo.x_test[:1]
    return {
        "xgb_key_id": xgb.ensure_key(),
        "xgb_key": xgb.evaluation_key(),
        "logreg_key": logreg.evaluation_key(),
        "xgb_ct": xgb.encrypt(row)[0],
        "logreg_ct": logreg.encrypt(row)[0],
        "logreg": logreg,
        "row": row,
    }


@pytest.fixture(autouse=True)
def still_serving(server, demo, material):
    """After each bad request, the server still answers health checks and correct predictions."""
    yield
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200
    row = demo.x_test[:1]
    assert material["logreg"].predict(row)[0] == demo.clear_predict(LOGREG, row)[0]


def predict(server, model: str, body: bytes, key_id: str | None = None, **headers: str) -> httpx.Response:
    headers = {**OCTET, **headers}
    if key_id:
        headers["X-FHE-Key-Id"] = key_id
    return httpx.post(f"{server.url}/v1/models/{model}/predict", content=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"\x00garbage" * 50, 400, "invalid_ciphertext"),
        (b"", 400, "empty_body"),
        ("truncated", 400, "invalid_ciphertext"),
        ("other_model", 422, "ciphertext_mismatch"),
    ],
)
def test_bad_ciphertexts(server, material, body, status, code):
    if body == "truncated":
        body = material["xgb_ct"][: len(material["xgb_ct"]) // 2]
    elif body == "other_model":
        body = material["logreg_ct"]
    assert_error(predict(server, XGB, body, material["xgb_key_id"]), status, code)


def test_ciphertext_of_xgb_sent_to_logreg(server, material):
    assert_error(predict(server, LOGREG, material["xgb_ct"]), 422, "ciphertext_mismatch")


def test_unknown_model(server, material):
    assert_error(predict(server, "no-such-model", material["xgb_ct"]), 404, "unknown_model")
    assert_error(httpx.get(f"{server.url}/v1/models/no-such-model"), 404, "unknown_model")


def test_unknown_and_malformed_key_ids(server, material):
    unknown = hashlib.sha256(b"never uploaded").hexdigest()
    assert_error(predict(server, XGB, material["xgb_ct"], unknown), 404, "unknown_key")
    assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{unknown}").status_code == 404
    assert_error(predict(server, XGB, material["xgb_ct"], "../../etc/passwd"), 400, "invalid_key_id")
    assert_error(predict(server, XGB, material["xgb_ct"]), 400, "missing_key_id")


def upload_key(server, body, model: str = XGB, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{model}/keys", content=body, headers={**OCTET, **headers}, timeout=120
    )


def test_bad_keys_are_refused_and_not_stored(server, material, server_workdir):
    key = material["xgb_key"]
    cases = [
        (b"not a key at all" * 1000, 400, "invalid_key"),
        (key[: len(key) // 3], 400, "invalid_key"),
        (material["logreg_key"], 422, "key_mismatch"),
    ]
    for body, status, code in cases:
        assert_error(upload_key(server, body), status, code)
        key_id = hashlib.sha256(body).hexdigest()
        assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 404
    assert not list((server_workdir / "keys").rglob(".tmp-*")), "a partial key file was left behind"
    assert not list((server_workdir / "staging").iterdir()), "an upload spool file was left behind"


def test_key_upload_is_idempotent(server, material):
    answer = upload_key(server, material["xgb_key"])
    assert answer.status_code == 200  # registered earlier in this module: known, not created
    assert answer.json() == {"key_id": material["xgb_key_id"], "bytes": len(material["xgb_key"])}


def test_oversized_bodies(server, material):
    too_big = b"\x00" * (2 * 1024 * 1024)  # over the 1 MiB ciphertext default
    assert_error(predict(server, XGB, too_big, material["xgb_key_id"]), 413, "payload_too_large")

    def stream() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for _ in range(65):
            yield b"\x00" * (1024 * 1024)

    assert_error(upload_key(server, stream()), 413, "payload_too_large")


def test_wrong_content_type(server, material):
    response = httpx.post(
        f"{server.url}/v1/models/{XGB}/predict",
        content=material["xgb_ct"],
        headers={"Content-Type": "application/json", "X-FHE-Key-Id": material["xgb_key_id"]},
    )
    assert_error(response, 415, "unsupported_media_type")
    assert_error(
        upload_key(server, material["xgb_key"], **{"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )


@pytest.mark.parametrize(
    "body",
    [
        b"garbage",
        wire.MAGIC,
        wire.MAGIC + b"\x00\x00\x00\x02\x00\x00\x00\x05abc",
        wire.MAGIC + b"\xff\xff\xff\xff",
    ],
)
def test_bad_batch_framing(server, material, body):
    response = httpx.post(
        f"{server.url}/v1/models/{LOGREG}/predict_batch",
        content=body,
        headers={"Content-Type": wire.CONTENT_TYPE},
    )
    assert_error(response, 400, "invalid_batch")


def test_batch_with_one_bad_row_is_refused_whole(server, material):
    body = wire.encode_batch([material["logreg_ct"], b"\x01garbage"])
    response = httpx.post(
        f"{server.url}/v1/models/{LOGREG}/predict_batch",
        content=body,
        headers={"Content-Type": wire.CONTENT_TYPE},
    )
    assert_error(response, 400, "invalid_ciphertext")


def test_delete_key_then_client_reuploads_transparently(server, demo, client_cache):
    remote = FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB)
    key_id = remote.ensure_key()
    assert httpx.delete(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 204
    assert_error(httpx.delete(f"{server.url}/v1/models/{XGB}/keys/{key_id}"), 404, "unknown_key")
    row = demo.x_test[50:51]
    assert remote.predict(row)[0] == demo.clear_predict(XGB, row)[0]  # unknown_key -> upload -> retry
    assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 200


def test_oversized_headers_get_431(server, material):
    response = httpx.post(
        f"{server.url}/v1/models/{LOGREG}/predict",
        content=material["logreg_ct"],
        headers={**OCTET, "X-Padding": "p" * 20000},
    )
    assert_error(response, 431, "headers_too_large")
    assert httpx.get(f"{server.url}/ping").status_code == 200


def test_a_stalled_body_gets_408_and_leaves_nothing_behind(server, server_workdir):
    """Headers promise 1 MB of key; 10 bytes come, then nothing for longer than FHE_BENTO_BODY_IDLE_SECONDS."""
    staging = server_workdir / "staging"
    before = set(staging.iterdir())
    status, body = _raw_request(
        server,
        f"/v1/models/{XGB}/keys",
        "Content-Length: 1000000\r\n",
        b"0123456789",
        content_type="application/octet-stream",
    )
    assert status.startswith(b"HTTP/1.1 408") and body["error"]["code"] == "body_timeout"
    assert set(staging.iterdir()) == before  # the partial spool file was removed


BOUNDARY = "fhebentotest"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _file_part(field: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="f.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _chunked(data: bytes, size: int = 64 * 1024) -> bytes:
    frames = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)
    ]
    return b"".join(frames) + b"0\r\n\r\n"


def _raw_request(
    server, path: str, headers: str, body: bytes, content_type: str = MULTIPART["Content-Type"]
) -> tuple[bytes, dict]:
    """Send a request head and (part of) a body on a raw socket; returns the answer's status line and JSON
    body. Reads until the JSON body ends or the server closes; the socket timeout bounds the wait."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n{headers}\r\n".encode()
            + body
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], json.loads(payload)


def test_a_request_that_frames_its_body_two_ways_is_refused_before_the_service(server):
    """`Content-Length: 200` with `Transfer-Encoding: chunked`, the shape of request smuggling: the HTTP
    parser (httptools) refuses it with 400 at its head, before the service sees a byte (docs/security.md);
    the server goes on serving."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as conn:
        conn.sendall(
            f"POST /compute HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART['Content-Type']}\r\n"
            "Content-Length: 200\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + _chunked(_file_part("model_input"))
        )
        answer = b""
        while b"\r\n" not in answer and (chunk := conn.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200


def test_a_form_with_no_content_length_over_the_key_limit_gets_413(server, server_workdir):
    """A chunked /add_key body (httpx sends a generator without Content-Length) of 65 MiB, over the
    server's 64 MiB key limit: refused while it streams, nothing left in the staging folder."""
    staging = server_workdir / "staging"
    before = set(staging.iterdir())

    def stream() -> Iterator[bytes]:
        yield _file_part("key")
        for _ in range(65):
            yield b"\x00" * (1024 * 1024)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    response = httpx.post(f"{server.url}/add_key", content=stream(), headers=MULTIPART, timeout=120)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")
    assert set(staging.iterdir()) == before


@pytest.mark.parametrize(
    ("path", "framing"),
    [
        ("/compute", "Content-Length: 100000\r\n"),
        ("/add_key", "Transfer-Encoding: chunked\r\n"),
    ],
)
def test_a_stalled_form_gets_408(server, path, framing):
    """The head and the start of a form, then nothing for longer than FHE_BENTO_BODY_IDLE_SECONDS (5 s)."""
    start = _file_part("model_input" if path == "/compute" else "key") + b"0123456789"
    if "chunked" in framing:
        start = b"%x\r\n%s\r\n" % (len(start), start)  # one chunk, and no last chunk
    status, body = _raw_request(server, path, framing, start)
    assert status.startswith(b"HTTP/1.1 408") and body["error"]["code"] == "body_timeout"
