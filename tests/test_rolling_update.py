"""A rolling update under load (docs/operations.md, "Updates"): clients predict without pause through a
SageMaker-like endpoint (`harness.sagemaker_balancer`) while the fleet moves from a server of version 1 to
one of versions 1 and 2 (its default), the old one leaves the endpoint and is SIGTERMed (it drains), and
version 1 is retired at last. Both servers share one s3:// key store (moto's server mode)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import boto3
import httpx
from conftest import Versions

from fhe_bento.client import FHEClient
from harness.devserver import Server
from harness.sagemaker_balancer import Balancer

BUCKET = "fhe-bento-rolling"
CLIENTS = 2
ROWS = 2  # rows per prediction call


@dataclass
class Client:
    """One data owner predicting in a loop: what it got, under which version, and when."""

    model: object
    answers: list[tuple[float, str, bool]] = field(default_factory=list)  # (time, version tag, correct)
    error: BaseException | None = None

    def run(self, versions: Versions, x, stop: threading.Event) -> None:
        index = 0
        try:
            while not stop.is_set():
                rows = x[index % (len(x) - ROWS) :][:ROWS]
                got = list(self.model.predict(rows))
                tag = self.model.pin.tag
                expected = list(versions.models[tag].predict(rows, fhe="disable"))
                self.answers.append((time.monotonic(), tag, got == expected))
                index += ROWS
        except BaseException as exc:  # reported by the test
            self.error = exc

    def on(self, tag: str) -> int:
        return sum(1 for _, t, _ in self.answers if t == tag)


def _server(workdir, tags: list[str]) -> Server:
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": ",".join(tags),
            "FHE_BENTO_KEY_STORE": f"s3://{BUCKET}/shared",
            "FHE_BENTO_STAGING_DIR": str(workdir / "staging"),
            "FHE_BENTO_WORKERS": "1",
            "FHE_BENTO_VERSIONS_REFRESH_SECONDS": "1",
        },
    )
    server.start()
    return server


def _fhe_bento(*args: str) -> str:
    """The `fhe-bento` command line, in process; its output."""
    from click.testing import CliRunner

    from fhe_bento.modelkit.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _sha(server: Server, tag: str) -> str:
    return httpx.get(f"{server.url}/v1/models/{tag}").json()["client_sha256"]


def _until(condition, what: str, limit: float = 300.0) -> None:
    """Poll until condition() is true; the limit only stops a broken run from hanging."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def test_clients_predict_through_an_update_a_drain_and_a_retirement(
    logreg_versions, demo, moto_url, tmp_path, caplog
):
    v1, v2 = logreg_versions.tags
    name = logreg_versions.name
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    old = _server(tmp_path / "old", [v1])
    new = None
    stop = threading.Event()
    with Balancer([old.url], seed=3) as endpoint:
        runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoint.url)
        clients = [
            Client(
                FHEClient.sagemaker(
                    "fhe-bento", runtime_client=runtime, cache_dir=tmp_path / f"c{i}", progress=False
                ).model(name)
            )
            for i in range(CLIENTS)
        ]
        assert {client.model.pin.tag for client in clients} == {v1}
        threads = [threading.Thread(target=c.run, args=(logreg_versions, demo.x_test, stop)) for c in clients]
        try:
            with caplog.at_level(logging.WARNING, logger="fhe_bento.client"):
                for thread in threads:
                    thread.start()
                _until(lambda: all(c.on(v1) >= 3 for c in clients), "predictions on the old server")
                # The update: the new fleet joins, then the old one leaves the endpoint and is SIGTERMed.
                new = _server(tmp_path / "new", [v1, v2])
                endpoint.add(new.url)
                _until(lambda: endpoint.counts("predict_batch")[new.url] >= 2, "traffic on the new server")
                endpoint.remove(old.url)
                os.kill(old.proc.pid, signal.SIGTERM)
                assert old.proc.wait(60) is not None
                old.proc = None
                served = sum(c.on(v1) for c in clients)
                _until(lambda: sum(c.on(v1) for c in clients) >= served + 4, "predictions after the drain")
                # Version 1 pinned clients keep it while it is served; then the operator retires it.
                listed = _fhe_bento("versions", "list", "--url", new.url, "--model", name)
                assert listed.splitlines() == [
                    f"{v1}  served  client_sha256={_sha(new, v1)}",
                    f"{v2}  default  client_sha256={_sha(new, v2)}",
                ]
                retired = _fhe_bento(
                    "versions", "retire", "--url", new.url, "--model", name, v1.split(":")[1]
                )
                assert (
                    retired
                    == f"{name}: default {v2.split(':')[1]}, retired {v1.split(':')[1]} (revision 1)\n"
                )
                _until(lambda: all(c.on(v2) >= 3 for c in clients), "predictions on version 2")
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)
            for server in (old, new):
                if server is not None:
                    server.stop()

    for client in clients:
        assert client.error is None, repr(client.error)
        assert all(correct for _, _, correct in client.answers)
        tags = [tag for _, tag, _ in client.answers]
        switch = tags.index(v2)  # pinned to version 1 until it was retired, then to version 2 for good
        assert set(tags[:switch]) == {v1} and set(tags[switch:]) == {v2}
    rekeys = [r.getMessage() for r in caplog.records if "is retired" in r.getMessage()]
    assert len(rekeys) == CLIENTS  # each client re-keyed once
    times = sorted(t for client in clients for t, _, _ in client.answers)
    gap = max(b - a for a, b in itertools.pairwise(times))
    waits = max(b - a for c in clients for (a, *_), (b, *_) in itertools.pairwise(c.answers))
    print(
        f"\nrolling update: {len(times)} predictions; longest time with no answer to any client {gap:.2f} s, "
        f"longest wait of one client between two answers {waits:.2f} s"
    )
