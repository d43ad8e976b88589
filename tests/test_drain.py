"""The drain on SIGTERM, on a real `bentoml serve` (docs/operations.md, "Drain on SIGTERM"): SIGTERM to the
server's main process, as SageMaker sends it to the container's PID 1, while rows of a bootstrapped circuit
and a key upload are in flight."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from conftest import XGB, assert_error

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire
from fhe_bento.protocol.keys import key_id
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from harness.devserver import Server

ROWS = 8  # about 6 s of FHE on one engine process: still running when SIGTERM comes
DRAIN_SECONDS = 25


def _wait_for(condition, what: str, limit: float = 120.0):
    """Poll until condition() is truthy; the limit only stops a broken run from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _post_in_background(
    answers: dict, name: str, url: str, body: bytes, headers: dict[str, str]
) -> threading.Thread:
    """POST in a thread of its own, started; its answer (or transport error) lands in answers[name]."""

    def send() -> None:
        try:
            answers[name] = httpx.post(url, content=body, headers=headers, timeout=120)
        except httpx.HTTPError as exc:
            answers[name] = exc

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _assert_draining(server: Server, row: bytes, key: str) -> None:
    """Right after SIGTERM: /ping and /readyz 503, and a new request 503 draining with Retry-After."""
    ping = _wait_for(
        lambda: (r := httpx.get(f"{server.url}/ping", timeout=5)).status_code == 503 and r,
        "/ping 503 after SIGTERM",
    )
    assert_error(ping, 503, "draining")
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    refused = httpx.post(
        f"{server.url}/v1/models/{XGB}/predict",
        content=row,
        headers={"Content-Type": OCTET_STREAM, KEY_ID_HEADER: key},
    )
    assert_error(refused, 503, "draining")
    assert refused.headers["retry-after"] == "1"


def test_sigterm_drains_rows_and_a_key_upload_then_exits(demo, tmp_path):
    env = {
        "FHE_BENTO_MODELS": f"{XGB}:latest",
        "FHE_BENTO_WORKERS": "1",
        "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
        "FHE_BENTO_STAGING_DIR": str(tmp_path / "staging"),
        "FHE_BENTO_DRAIN_SECONDS": str(DRAIN_SECONDS),
    }
    server = Server(tmp_path / "server", env)
    server.start()
    owner = FHEClient(server.url, cache_dir=tmp_path / "owner", progress=False).model(XGB)
    owner_key = owner.ensure_key()
    x = demo.x_test[:ROWS]
    rows = owner.encrypt(x)
    newcomer = FHEClient(server.url, cache_dir=tmp_path / "newcomer", progress=False).model(XGB)
    new_key = newcomer.evaluation_key()  # not uploaded yet
    answers: dict[str, httpx.Response | Exception] = {}
    batch = _post_in_background(
        answers,
        "batch",
        f"{server.url}/v1/models/{XGB}/predict_batch",
        wire.encode_batch(rows),
        {"Content-Type": wire.CONTENT_TYPE, KEY_ID_HEADER: owner_key},
    )
    try:
        _wait_for(lambda: server.metric("fhe_bento_queue_rows") == ROWS, "the batch's rows in flight")
        upload = _post_in_background(
            answers, "upload", f"{server.url}/v1/models/{XGB}/keys", new_key, {"Content-Type": OCTET_STREAM}
        )
        time.sleep(0.2)  # the upload's body on its way; registered or not by SIGTERM, never half
        os.kill(server.proc.pid, signal.SIGTERM)

        _assert_draining(server, rows[0], owner_key)
        assert "batch" not in answers, "the rows should still be running"

        batch.join(120)
        upload.join(120)
        answered = answers["batch"]
        assert isinstance(answered, httpx.Response) and answered.status_code == 200, answered
        labels = [
            owner.labels(owner.decrypt(a).reshape(1, -1))[0]
            for a in wire.decode_batch(answered.content, ROWS)
        ]
        assert labels == list(demo.clear_predict(XGB, x))

        assert server.proc.wait(DRAIN_SECONDS + 20) is not None  # exited by itself, within the bound
        log = server.log()
        assert "drain drained in" in log and "1 refused" in log, log[-3000:]
    finally:
        if server.proc is not None and server.proc.poll() is not None:
            server.proc = None
        server.stop()

    _assert_whole_or_absent(server, answers.get("upload"), newcomer, new_key, demo, tmp_path / "staging")


def _assert_whole_or_absent(server, uploaded, newcomer, new_key: bytes, demo, staging) -> None:
    """The upload cut by the drain is registered whole, or not at all: the restarted server (same store)
    says which, and a key it has is complete (a prediction with it decrypts correctly)."""
    server.start()
    try:
        registered = httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id(new_key)}").status_code
        if isinstance(uploaded, httpx.Response) and uploaded.status_code == 201:
            assert registered == 200
            got = newcomer.predict(demo.x_test[:1])
            assert list(got) == list(demo.clear_predict(XGB, demo.x_test[:1]))
        else:
            assert registered == 404, uploaded
        assert not staging.exists() or not any(p.is_file() for p in staging.rglob("*")), "spool left behind"
    finally:
        server.stop()
