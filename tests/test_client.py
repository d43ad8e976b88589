"""The Python client against real concrete (the demo models): private keys, retries, sessions, connections."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fhe_bento.protocol import wire

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


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


@pytest.mark.parametrize("code", ["overloaded", "runner_unavailable", "draining"])
@pytest.mark.parametrize("transport", ["http", "sagemaker"])
def test_client_retries_a_busy_or_restarting_server_after_retry_after(
    demo, tmp_path, monkeypatch, code, transport
):
    import json
    from types import SimpleNamespace

    import httpx
    from conftest import LOGREG

    from fhe_bento.client import FHEClient, retry
    from fhe_bento.client.answers import FHEServiceError
    from fhe_bento.client.http_transport import HTTPTransport
    from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
    from fhe_bento.protocol.names import ATTRIBUTES_HEADER

    dev = _DevFolderTransport(demo.dev_dirs[LOGREG])
    refusals = {"left": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        op = dict(f.strip().split("=", 1) for f in request.headers.get(ATTRIBUTES_HEADER, "").split(";") if f)
        op = op.get("op") or request.url.path.rsplit("/", 1)[-1]
        if op in (LOGREG, "get_model"):
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
    monkeypatch.setattr(retry, "time", SimpleNamespace(sleep=sleeps.append))
    model = FHEClient(transport=chosen, cache_dir=tmp_path, progress=False, max_retries=3).model(LOGREG)

    refusals["left"] = 3  # as many as max_retries: the last attempt answers
    assert model._run_batch([b"row"]) == [b"answer"]
    assert len(sleeps) == 3 and all(7 <= s <= 7 * 1.5 for s in sleeps)

    sleeps.clear()
    refusals["left"] = 4  # one more than max_retries: the error reaches the caller
    with pytest.raises(FHEServiceError) as refused:
        model._run_batch([b"row"])
    assert refused.value.code == code and refused.value.status == 503 and len(sleeps) == 3


def test_the_retry_policy_retries_only_busy_answers_and_backs_off_without_retry_after(monkeypatch):
    """One policy for every transport: `protocol.errors.is_retryable` says which answers, Retry-After (or
    a capped exponential backoff, with jitter) how long, `max_retries` how often."""
    from types import SimpleNamespace

    from fhe_bento.client import retry
    from fhe_bento.client.answers import FHEServiceError

    sleeps: list[float] = []
    monkeypatch.setattr(retry, "time", SimpleNamespace(sleep=sleeps.append))
    policy = retry.RetryPolicy(max_retries=7)

    def failing(error: FHEServiceError):
        def call() -> None:
            raise error

        return call

    for refused in (FHEServiceError(400, "invalid_batch", ""), FHEServiceError(404, "unknown_key", "")):
        with pytest.raises(FHEServiceError):
            policy(failing(refused))
    assert sleeps == []  # not retried
    with pytest.raises(FHEServiceError):
        policy(failing(FHEServiceError(503, "http_error", "a proxy's 503")))
    waits = [min(retry.BACKOFF_CAP, retry.BACKOFF_BASE * 2**n) for n in range(7)]
    assert len(sleeps) == 7 and all(w <= s <= w * retry.JITTER for w, s in zip(waits, sleeps, strict=True))


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
