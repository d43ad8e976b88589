"""The runner stands alone: `bentoml serve fhe_bento.runners.fhe_runner:FHERunner` on its own, and two HTTP services
(`FHE_BENTO_RUNNER_URL`) with their own BENTOML_HOME and staging folders calling it, keys in an `s3://`
store on moto's server. Nothing but the runner's API connects them: no shared disk.

The full flow: a whole key upload through one HTTP service, a key upload in parts sent half to each,
predictions (sent as batches) through the other, delete, and nothing left in any staging folder. And the
hop under load: across BentoML's connection-pool lifetime and the runner's keep-alive, no call is lost or
repeated.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest
from conftest import LOGREG, XGB

from fhe_bento.client import FHEClient
from fhe_bento.protocol.names import OCTET_STREAM, PART_BYTES
from harness.devserver import MotoServer, Server

BUCKET = "fhe-bento-standalone"
OCTET = {"Content-Type": OCTET_STREAM}
HOP_FAILURE = re.compile(r"runner call \w+ failed")


@pytest.fixture(scope="module")
def split(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    moto = MotoServer()
    boto3.client(
        "s3",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    common = {
        **moto.env(),
        "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
        "FHE_BENTO_KEY_STORE": f"s3://{BUCKET}/keys",
    }
    runner = Server.runner(
        root / "runner", {**common, "FHE_BENTO_STAGING_DIR": str(root / "runner" / "staging")}
    )
    servers = []
    try:
        runner.start()
        for name in ("a", "b"):
            server = Server(
                root / name,
                {
                    **common,
                    "FHE_BENTO_STAGING_DIR": str(root / name / "staging"),
                    "FHE_BENTO_RUNNER_URL": runner.url,
                },
            )
            server.start()
            servers.append(server)
        yield runner, *servers
    finally:
        for server in [*servers, runner]:
            server.stop()
        moto.stop()


def test_http_services_start_no_runner_of_their_own(split):
    runner, a, b = split
    assert runner.engines()
    assert not a.engines() and not b.engines()
    assert httpx.get(f"{a.url}/ping").status_code == httpx.get(f"{b.url}/ping").status_code == 200


def test_whole_and_part_uploads_predict_and_delete_through_a_remote_runner(split, demo, tmp_path):
    runner, a, b = split
    x = demo.x_test[:3]
    clear = demo.clear_predict(XGB, x)

    # A whole upload through A; predictions with that key through B.
    first = FHEClient(b.url, cache_dir=tmp_path / "first", progress=False).model(XGB)
    whole = httpx.post(
        f"{a.url}/v1/models/{XGB}/keys", content=first.evaluation_key(), headers=OCTET, timeout=300
    )
    assert whole.status_code == 201, whole.text
    first_id = whole.json()["key_id"]
    assert first.ensure_key() == first_id  # B sees the key A registered: nothing is uploaded again
    assert list(first.predict(x)) == list(clear)

    # A key in parts, half to each HTTP service; completed through A, used through B in one batch.
    second = FHEClient(b.url, cache_dir=tmp_path / "second", progress=False).model(XGB)
    key = second.evaluation_key()
    second_id = hashlib.sha256(key).hexdigest()
    count = -(-len(key) // PART_BYTES)
    assert count > 2
    for index in range(count):
        server = (a, b)[index % 2]
        part = httpx.put(
            f"{server.url}/v1/models/{XGB}/keys/{second_id}/parts/{index}",
            content=key[index * PART_BYTES : (index + 1) * PART_BYTES],
            headers=OCTET,
            timeout=60,
        )
        assert part.status_code == 200, part.text
    held = httpx.get(f"{b.url}/v1/models/{XGB}/keys/{second_id}/parts").json()
    assert held["parts"] == list(range(count)) and held["bytes"] == len(key)
    done = httpx.post(
        f"{a.url}/v1/models/{XGB}/keys/{second_id}/complete", params={"parts": count}, timeout=300
    )
    assert done.status_code == 201, done.text
    assert second.ensure_key() == second_id
    assert list(second.predict(x)) == list(clear)  # the client sends its rows as one batch

    # Delete through B: gone for A too, and from the shared store.
    assert httpx.delete(f"{b.url}/v1/models/{XGB}/keys/{first_id}").status_code == 204
    assert httpx.head(f"{a.url}/v1/models/{XGB}/keys/{first_id}").status_code == 404
    assert httpx.head(f"{a.url}/v1/models/{XGB}/keys/{second_id}").status_code == 200
    for server in (runner, a, b):
        assert not list((server.workdir / "staging").iterdir()), server.workdir


def test_the_runner_hop_loses_and_repeats_no_call_across_idle_periods(split, demo, tmp_path):
    """More calls than BentoML's default connection-pool lifetime (100), from 4 threads, then idle periods
    longer than the runner's keep-alive (5 s): every request is answered 200 once, the runner computed each
    row exactly once, and no call on the hop failed or was retried."""
    runner, server, _ = split
    logreg = FHEClient(server.url, cache_dir=tmp_path, progress=False).model(LOGREG)
    ciphertext = logreg.encrypt(demo.x_test[:1])[0]
    log_start = len(server.log())
    computed = runner.metric("fhe_bento_rows_total", model=LOGREG, outcome="ok")

    def predict(_: int) -> int:
        return httpx.post(
            f"{server.url}/v1/models/{LOGREG}/predict", content=ciphertext, headers=OCTET, timeout=60
        ).status_code

    statuses = []
    with ThreadPoolExecutor(4) as pool:
        for requests, idle in ((160, 6.5), (20, 6.5), (20, 0)):
            statuses += pool.map(predict, range(requests))
            time.sleep(idle)
    assert statuses == [200] * 200
    assert runner.metric("fhe_bento_rows_total", model=LOGREG, outcome="ok") - computed == 200
    failures = [line for line in server.log()[log_start:].splitlines() if HOP_FAILURE.search(line)]
    assert not failures
