"""Crashes that get through anyway, as an image runs (BENTOML_CONTAINERIZED=true: BentoML respawns nothing).

- An engine process SIGKILLed mid-row: its worker survives and starts a new engine, the row in
  flight gets 503 runner_unavailable with Retry-After, /ping is 503 until the new engine is ready, and
  then predictions decrypt correctly again.
- The worker (which holds the runner) SIGKILLed: /ping is never 200 again, and the server exits with a
  failure status, with no engine left behind, so that an orchestrator replaces it; hung: no /ping answer.
- More warm keys than the cache holds: the engine's resident memory grows by no more than the bound.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import LOGREG, assert_error, imported_spec  # rows must take seconds here
from conftest import REALISTIC_XGB as XGB

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire
from harness.devserver import Server

OCTET = {"Content-Type": "application/octet-stream"}
pytestmark = pytest.mark.usefixtures("realistic_xgb")
CONTAINERIZED = {"BENTOML_CONTAINERIZED": "true", "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest"}


def wait_for(condition, what: str, limit: float = 300.0, every: float = 0.1):
    """Poll until condition() is truthy; the limit only stops a broken run from hanging."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"never happened: {what}")


def ping(server: Server) -> int:
    try:
        return httpx.get(f"{server.url}/ping", timeout=5).status_code
    except httpx.TransportError:
        return 0


@pytest.fixture(scope="module")
def image_like(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    server = Server(root / "server", {**CONTAINERIZED, "FHE_BENTO_KEY_STORE": (root / "keys").as_uri()})
    server.start()
    yield server
    assert server.stop() == 0, "after its crashes and abandoned requests, the server did not stop on SIGTERM"


def test_an_engine_killed_mid_row_is_replaced_and_the_row_is_retryable(image_like, demo, tmp_path):
    client = FHEClient(image_like.url, cache_dir=tmp_path / "owner", progress=False)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    key_id, row = xgb.ensure_key(), demo.x_test[:1]
    assert xgb.predict(row)[0] == demo.clear_predict(XGB, row)[0]
    worker = image_like.worker()
    (engine,) = image_like.engines()
    cpu_before = sum(engine.cpu_times()[:2])
    answers = []
    sender = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{image_like.url}/v1/models/{XGB}/predict",
                content=xgb.encrypt(row)[0],
                headers={**OCTET, "X-FHE-Key-Id": key_id},
                timeout=600,
            )
        )
    )
    sender.start()
    wait_for(lambda: sum(engine.cpu_times()[:2]) > cpu_before + 1.0, "the engine computing the row")
    killed_at = time.monotonic()
    engine.send_signal(signal.SIGKILL)
    sender.join()
    (answer,) = answers
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "runner_unavailable", answer.text
    assert int(answer.headers["Retry-After"]) > 0
    wait_for(lambda: ping(image_like) == 200, "/ping back to 200")
    recovered = time.monotonic() - killed_at
    assert worker.is_running() and image_like.worker().pid == worker.pid  # the supervisor survived
    assert [e.pid for e in image_like.engines()] != [engine.pid]
    for model, clear in ((xgb, XGB), (logreg, LOGREG)):
        assert model.predict(row)[0] == demo.clear_predict(clear, row)[0]
    assert image_like.metric("fhe_bento_engine_restarts_total") == 1
    print(f"engine recovered {recovered:.1f} s after SIGKILL")


def test_the_engines_forkserver_ignores_the_stop_signal(image_like):
    """BentoML stops a runner worker by signalling it and its children: a forkserver that died of SIGTERM
    would make every engine it forked look crashed while the server stops, and a new engine would start."""
    (engine,) = image_like.engines()
    status = Path(f"/proc/{engine.parent().pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    assert ignored & (1 << (signal.SIGTERM - 1)), status


def test_ping_is_503_while_the_engine_restarts(image_like, demo, tmp_path):
    logreg = FHEClient(image_like.url, cache_dir=tmp_path / "owner", progress=False).model(LOGREG)
    row = demo.x_test[:1]
    (engine,) = image_like.engines()
    engine.send_signal(signal.SIGKILL)
    wait_for(lambda: ping(image_like) == 503, "/ping 503 after the engine died")
    # While /ping says 503, a prediction is refused with the retryable code, or (if the engine came back
    # in between) answered correctly: never a 5xx of another kind, never a wrong answer.
    response = httpx.post(
        f"{image_like.url}/v1/models/{LOGREG}/predict",
        content=logreg.encrypt(row)[0],
        headers=OCTET,
        timeout=60,
    )
    if response.status_code != 200:
        assert response.status_code == 503 and response.json()["error"]["code"] == "runner_unavailable"
    wait_for(lambda: ping(image_like) == 200, "/ping back to 200")
    assert logreg.predict(row)[0] == demo.clear_predict(LOGREG, row)[0]


def test_rows_of_a_request_whose_client_went_away_are_dropped(image_like, demo, tmp_path):
    xgb = FHEClient(image_like.url, cache_dir=tmp_path / "owner", progress=False).model(XGB)
    key_id = xgb.ensure_key()
    rows = 12
    batch = wire.encode_batch(xgb.encrypt(demo.x_test[:rows]))
    computed = image_like.metric("fhe_bento_rows_total", model=XGB, outcome="ok")
    dropped = image_like.metric("fhe_bento_rows_total", model=XGB, outcome="dropped")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up during the first row (each takes seconds)
        httpx.post(
            f"{image_like.url}/v1/models/{XGB}/predict_batch",
            content=batch,
            timeout=httpx.Timeout(60, read=3),
            headers={"Content-Type": wire.CONTENT_TYPE, "X-FHE-Key-Id": key_id},
        )
    wait_for(
        lambda: image_like.metric("fhe_bento_rows_total", model=XGB, outcome="dropped") > dropped,
        "rows dropped",
    )
    # The abandoned request ends at once (the access log's 499): BentoML's timeout middleware, which waits for
    # a first message, held a request that sent none until its 605 s deadline, and the server's stop with it.
    abandoned = re.compile(rf"path=/v1/models/{XGB}/predict_batch,[^)]*\) \(status=499,")
    wait_for(lambda: abandoned.search(image_like.log()), "the abandoned request's access log line", limit=120)
    wait_for(
        lambda: ping(image_like) == 200 and image_like.metric("fhe_bento_queue_rows", model=XGB) == 0, "idle"
    )
    # The engine evaluates rows in order, so this row comes after whatever of the batch had already started.
    assert xgb.predict(demo.x_test[:1])[0] == demo.clear_predict(XGB, demo.x_test[:1])[0]
    computed = image_like.metric("fhe_bento_rows_total", model=XGB, outcome="ok") - computed - 1
    dropped = image_like.metric("fhe_bento_rows_total", model=XGB, outcome="dropped") - dropped
    assert computed + dropped == rows
    # Rows take seconds each and the server notices the client leave within about a second, so only the
    # rows already handed to the engine (one running, at most two queued in its pipe) or finished by then run.
    assert dropped >= rows // 2, (computed, dropped)


def test_a_batch_that_cannot_finish_in_time_is_refused_up_front(image_like, demo, tmp_path):
    """256 XGB rows (FHE_BENTO_MAX_BATCH_ROWS) at seconds each cannot finish in the default 600 s."""
    xgb = FHEClient(image_like.url, cache_dir=tmp_path / "owner", progress=False).model(XGB)
    key_id = xgb.ensure_key()
    computed = image_like.metric("fhe_bento_rows_total", model=XGB, outcome="ok")
    rows = xgb.encrypt(demo.x_test.repeat(3, axis=0)[:256])
    response = httpx.post(
        f"{image_like.url}/v1/models/{XGB}/predict_batch",
        content=wire.encode_batch(rows),
        headers={"Content-Type": wire.CONTENT_TYPE, "X-FHE-Key-Id": key_id},
        timeout=60,
    )
    assert_error(response, 413, "batch_too_long")
    fit = int(re.search(r"(\d+) rows fit", response.json()["error"]["message"]).group(1))
    assert 0 < fit < 256
    assert image_like.metric("fhe_bento_rows_total", model=XGB, outcome="ok") == computed


def _containerized_server(tmp_path: Path) -> Server:
    server = Server(
        tmp_path / "server", {**CONTAINERIZED, "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri()}
    )
    server.start()
    return server


def test_a_killed_worker_stops_the_server_with_a_failure_status(demo, tmp_path):
    """The worker holds the runner: BentoML's arbiter, which respawns nothing in an image, quits when its
    last worker is gone (status 1), and the engines exit with their supervisor."""
    server = _containerized_server(tmp_path)
    proc = server.proc
    try:
        engine_pids = [e.pid for e in server.engines()]
        assert engine_pids
        server.worker().send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        pings = []  # (seconds since the kill, status)
        wait_for(
            lambda: pings.append((time.monotonic() - killed_at, ping(server))) or proc.poll() is not None,
            "the server to exit",
            every=0.2,
        )
        assert not [(t, status) for t, status in pings if t > 0.5 and status == 200], pings
        assert proc.returncode not in (0, None)
        wait_for(
            lambda: not [pid for pid in engine_pids if psutil.pid_exists(pid)], "the engines to exit with it"
        )
        print(f"server exited {time.monotonic() - killed_at:.1f} s after its worker got SIGKILL")
    finally:
        if proc.poll() is None:
            server.kill()


def test_a_hung_worker_answers_no_ping(demo, tmp_path):
    """/ping is answered by the worker that holds the runner, never by a process that would stay up
    without it: SageMaker takes an instance whose pings time out (2 s) for unhealthy, and replaces it."""
    server = _containerized_server(tmp_path)
    try:
        worker = server.worker()
        assert ping(server) == 200
        worker.send_signal(signal.SIGSTOP)
        statuses = []
        for _ in range(3):
            try:
                statuses.append(httpx.get(f"{server.url}/ping", timeout=2).status_code)
            except httpx.TransportError:
                statuses.append(0)
        assert statuses == [0, 0, 0]
        worker.send_signal(signal.SIGCONT)
        wait_for(lambda: ping(server) == 200, "/ping back once the worker runs again")
    finally:
        server.kill()


def test_warm_keys_stay_within_the_resident_bound(demo, tmp_path):
    warm = imported_spec(XGB).meta.warm_key_bytes
    bound = int(2.5 * warm)  # two warm keys fit
    server = Server(
        tmp_path / "server",
        {
            **CONTAINERIZED,
            "FHE_BENTO_KEY_CACHE_BYTES": str(bound),
            "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
        },
    )
    server.start()
    try:
        row = demo.x_test[:1]
        owners = [
            FHEClient(server.url, cache_dir=tmp_path / f"owner{i}", progress=False).model(XGB)
            for i in range(4)
        ]
        for owner in owners:
            owner.ensure_key()
        logreg = FHEClient(server.url, cache_dir=tmp_path / "logreg", progress=False).model(LOGREG)
        assert logreg.predict(row)[0] == demo.clear_predict(LOGREG, row)[0]  # the engine has computed once
        (engine,) = server.engines()
        before = engine.memory_info().rss
        growth = []
        for owner in owners + owners[:1]:  # the first was evicted by then: loaded again
            assert owner.predict(row)[0] == demo.clear_predict(XGB, row)[0]
            growth.append(engine.memory_info().rss - before)
        # Four keys of `warm` bytes each went through a cache bounded to 2.5 x warm (unbounded, it would have
        # grown by about 4 x warm).
        assert max(growth) <= bound + 0.25 * warm, ([g / 1e6 for g in growth], warm / 1e6)
        print(
            f"warm key {warm / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB, growth MB: {[round(g / 1e6) for g in growth]}"
        )
        # A server full of warm keys stops on SIGTERM alone, and its engine ends as stopped, not as crashed.
        assert server.stop() == 0
        assert "FHE engine process died" not in server.log()
    finally:
        server.stop()
