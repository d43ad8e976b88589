"""Concurrency and overload against a real `bentoml serve`: answers never cross between clients, a full
queue gets 503 `overloaded` with Retry-After, and everything admitted completes correctly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import REALISTIC_XGB, XGB

from fhe_bento.client import FHEClient
from harness.devserver import Server


def test_concurrent_clients_with_their_own_keys_get_their_own_answers(server, demo, tmp_path):
    """Three data owners, three key sets, one model, at once. An answer computed under another client's
    key (or meant for another client) would not decrypt to the clear prediction."""
    owners = [
        FHEClient(server.url, cache_dir=tmp_path / f"owner{i}", progress=False).model(XGB) for i in range(3)
    ]
    key_ids = {owner.ensure_key() for owner in owners}
    assert len(key_ids) == 3
    rows = [demo.x_test[i : i + 1] for i in (3, 4, 5)]  # rows with both classes among them
    with ThreadPoolExecutor(len(owners)) as pool:
        answers = list(pool.map(lambda pair: pair[0].predict_proba(pair[1]), zip(owners, rows, strict=True)))
    for owner_rows, proba in zip(rows, answers, strict=True):
        np.testing.assert_allclose(
            proba, demo.models[XGB].predict_proba(owner_rows, fhe="disable"), atol=1e-6
        )


@pytest.fixture(scope="module")
def tight(demo, realistic_xgb, tmp_path_factory):
    """A server that admits two rows of each XGB model at a time."""
    workdir = tmp_path_factory.mktemp("tight")
    srv = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest,{realistic_xgb}:latest",
            "FHE_BENTO_KEY_STORE": (workdir / "keys").as_uri(),
            "FHE_BENTO_MAX_QUEUE_ROWS": "2",
        },
    )
    srv.start()
    yield srv
    srv.stop()


def test_full_queue_gets_503_with_retry_after_and_admitted_work_completes(tight, demo, tmp_path):
    remote = FHEClient(tight.url, cache_dir=tmp_path, progress=False).model(XGB)
    key_id = remote.ensure_key()
    rows = demo.x_test[6:12]
    ciphertexts = remote.encrypt(rows)

    def send(ciphertext: bytes) -> httpx.Response:
        return httpx.post(
            f"{tight.url}/v1/models/{XGB}/predict",
            content=ciphertext,
            timeout=300,
            headers={"Content-Type": "application/octet-stream", "X-FHE-Key-Id": key_id},
        )

    with ThreadPoolExecutor(len(ciphertexts)) as pool:
        responses = list(pool.map(send, ciphertexts))
    accepted = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) >= 2 and refused, [r.status_code for r in responses]
    for response in refused:
        assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
    for index, response in accepted:
        proba = remote.fhe.deserialize_decrypt_dequantize(response.content)
        assert np.argmax(proba, axis=1)[0] == demo.clear_predict(XGB, rows[index : index + 1])[0]
    assert tight.metric("fhe_bento_overloaded_total", model=XGB) == len(refused)
    assert httpx.get(f"{tight.url}/ping", timeout=10).status_code == 200


def test_client_backs_off_and_gets_every_row(tight, demo, tmp_path):
    remote = FHEClient(tight.url, cache_dir=tmp_path, progress=False, batch_size=1, concurrency=4).model(XGB)
    rows = demo.x_test[12:16]
    refused_before = tight.metric("fhe_bento_overloaded_total", model=XGB)
    assert list(remote.predict(rows)) == list(demo.clear_predict(XGB, rows))
    assert (
        tight.metric("fhe_bento_overloaded_total", model=XGB) > refused_before
    )  # it was overloaded, and coped


def test_a_key_registers_while_rows_compute(tight, demo, tmp_path):
    """Key uploads are not queued behind FHE rows in the runner worker: a new key sent while a two-row
    batch of the realistic XGB (seconds a row) computes is registered before that batch answers."""
    busy = FHEClient(tight.url, cache_dir=tmp_path / "busy", progress=False, batch_size=2).model(
        REALISTIC_XGB
    )
    busy.ensure_key()
    newcomer = FHEClient(tight.url, cache_dir=tmp_path / "new", progress=False).model(REALISTIC_XGB)
    newcomer.evaluation_key()  # generated before the race starts
    finished: list[str] = []
    rows = demo.x_test[16:18]

    def batch() -> None:
        assert list(busy.predict(rows)) == list(demo.clear_predict(REALISTIC_XGB, rows))
        finished.append("batch")

    def upload() -> None:
        while (
            tight.metric("fhe_bento_queue_rows", model=REALISTIC_XGB) < 2 and not finished
        ):  # the batch runs
            time.sleep(0.05)
        newcomer.ensure_key()
        finished.append("key")

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(batch), pool.submit(upload)]:
            future.result()
    assert finished == ["key", "batch"]
