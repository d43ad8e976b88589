"""End to end over HTTP against a real `bentoml serve`: decrypted FHE answers equal the clear model's."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
from conftest import LOGREG, XGB

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire

ROWS = {XGB: 4, LOGREG: 40}


@pytest.fixture(scope="module")
def fhe_client(server, client_cache) -> FHEClient:
    return FHEClient(server.url, cache_dir=client_cache, batch_size=2, concurrency=2, progress=False)


@pytest.mark.parametrize("name", [LOGREG, XGB])
def test_predict_batch_matches_clear_predictions_row_by_row(name, demo, fhe_client):
    x = demo.x_test[: ROWS[name]]
    encrypted = fhe_client.model(name).predict(x)
    expected = demo.clear_predict(name, x)
    assert encrypted.shape == expected.shape
    for row, (got, want) in enumerate(zip(encrypted, expected, strict=True)):
        assert got == want, f"row {row}: FHE {got} != clear {want}"
    proba = fhe_client.model(name).predict_proba(x)
    np.testing.assert_allclose(proba, demo.models[name].predict_proba(x, fhe="disable"), atol=1e-6)


@pytest.mark.parametrize("name", [LOGREG, XGB])
def test_single_row_predict_route_matches_clear(name, demo, server, fhe_client):
    remote = fhe_client.model(name)
    key_id = remote.ensure_key()
    headers = {"Content-Type": "application/octet-stream"}
    if key_id:
        headers["X-FHE-Key-Id"] = key_id
    for row in demo.x_test[10:12]:
        (ciphertext,) = remote.encrypt(row.reshape(1, -1))
        response = httpx.post(
            f"{server.url}/v1/models/{name}/predict", content=ciphertext, headers=headers, timeout=120
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/octet-stream"
        proba = remote.fhe.deserialize_decrypt_dequantize(response.content)
        assert np.argmax(proba, axis=1)[0] == demo.clear_predict(name, row.reshape(1, -1))[0]


def test_model_listing_and_client_zip(server, demo):
    models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()}
    assert set(models) == {XGB, LOGREG}
    assert models[XGB]["needs_key"] is True and models[LOGREG]["needs_key"] is False
    assert models[XGB]["n_features"] == demo.x_test.shape[1] and models[XGB]["classes"] == [0, 1]
    one = httpx.get(f"{server.url}/v1/models/{XGB}").json()
    listed = models[XGB]
    assert listed["default"] is True and listed["retired"] is False  # the one version served
    assert {k: v for k, v in one.items() if k not in ("versions", "default_version")} == {
        k: v for k, v in listed.items() if k not in ("default", "retired")
    }
    assert one["default_version"] == one["version"]
    assert one["versions"] == {
        one["version"]: {"client_sha256": one["client_sha256"], "default": True, "retired": False}
    }
    zipped = httpx.get(f"{server.url}/v1/models/{XGB}/client.zip")
    assert zipped.headers["content-type"] == "application/zip"
    assert (
        hashlib.sha256(zipped.content).hexdigest()
        == zipped.headers["x-fhe-client-sha256"]
        == one["client_sha256"]
    )


def test_unmodified_zama_client_through_compatible_routes(server, demo, tmp_path):
    """The flow of Zama's deployment example: plain requests + FHEModelClient, nothing from fhe-bento."""
    from concrete.ml.deployment import FHEModelClient

    zipped = requests.get(f"{server.url}/get_client", timeout=30)
    assert zipped.status_code == 200
    (tmp_path / "client.zip").write_bytes(zipped.content)
    client = FHEModelClient(str(tmp_path), key_dir=str(tmp_path / "keys"))
    client.generate_private_and_evaluation_keys()
    key = client.get_serialized_evaluation_keys()
    uid = requests.post(f"{server.url}/add_key", files={"key": io.BytesIO(key)}, timeout=120).json()["uid"]
    assert uid == hashlib.sha256(key).hexdigest()
    row = demo.x_test[20:21]
    encrypted = client.quantize_encrypt_serialize(row)
    answer = requests.post(
        f"{server.url}/compute", files={"model_input": io.BytesIO(encrypted)}, data={"uid": uid}, timeout=120
    )
    assert answer.status_code == 200, answer.text
    proba = client.deserialize_decrypt_dequantize(answer.content)
    assert np.argmax(proba, axis=1)[0] == demo.clear_predict(XGB, row)[0]


def test_key_is_uploaded_once_and_survives_a_restart(server, demo, client_cache):
    row = demo.x_test[30:31]
    first = FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB)
    assert first.predict(row)[0] == demo.clear_predict(XGB, row)[0]
    uploads = server.metric("fhe_bento_key_uploads_total", model=XGB)
    part_bytes = server.metric("fhe_bento_key_part_bytes_total", model=XGB)
    assert part_bytes >= len(first.evaluation_key())  # the first run sent the key, in parts
    posts = server.metric("bentoml_service_request_total", endpoint=f"/v1/models/{XGB}/keys")

    second = FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB)
    assert second.predict(row)[0] == demo.clear_predict(XGB, row)[0]
    assert server.metric("fhe_bento_key_uploads_total", model=XGB) == uploads
    assert server.metric("fhe_bento_key_part_bytes_total", model=XGB) == part_bytes
    assert server.metric("bentoml_service_request_total", endpoint=f"/v1/models/{XGB}/keys") == posts

    key_id = second.ensure_key()
    server.restart()
    assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 200
    third = FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB)
    assert third.predict(row)[0] == demo.clear_predict(XGB, row)[0]
    assert server.metric("fhe_bento_key_uploads_total", model=XGB) == 0  # fresh process, no upload


def test_ping_answers_while_fhe_runs_on_every_worker(server, demo, client_cache):
    remote = FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB)
    key_id = remote.ensure_key()
    batches = [
        demo.x_test[40:44],
        demo.x_test[44:48],
    ]  # one batch of seconds per runner worker (the server runs two)

    def predict(rows: np.ndarray) -> list[bytes]:
        response = httpx.post(
            f"{server.url}/v1/models/{XGB}/predict_batch",
            content=wire.encode_batch(remote.encrypt(rows)),
            timeout=300,
            headers={"Content-Type": wire.CONTENT_TYPE, "X-FHE-Key-Id": key_id},
        )
        assert response.status_code == 200
        return wire.decode_batch(response.content, len(rows))

    with ThreadPoolExecutor(len(batches)) as pool:
        futures = [pool.submit(predict, rows) for rows in batches]
        while server.metric("fhe_bento_queue_rows", model=XGB) < 8 and not any(f.done() for f in futures):
            time.sleep(0.05)
        pings = []
        while not any(f.done() for f in futures):
            response = httpx.get(f"{server.url}/ping", timeout=10)
            pings.append((response.status_code, response.content, all(not f.done() for f in futures)))
            time.sleep(0.2)
        answers = [f.result() for f in futures]
    in_flight = [p for p in pings if p[2]]
    assert in_flight, "no ping was answered while both FHE runs were in flight"
    assert all(status == 200 and body == b"" for status, body, _ in in_flight)
    for batch_answers, rows in zip(answers, batches, strict=True):
        labels = remote.labels(np.stack([remote.decrypt(answer) for answer in batch_answers]))
        assert list(labels) == list(demo.clear_predict(XGB, rows))


def test_logreg_needs_no_key_upload(server, demo):
    with tempfile.TemporaryDirectory() as cache:
        before = server.metric("fhe_bento_key_uploads_total", model=LOGREG)
        remote = FHEClient(server.url, cache_dir=cache, progress=False).model(LOGREG)
        assert remote.ensure_key() is None
        assert list(remote.predict(demo.x_test[:5])) == list(demo.clear_predict(LOGREG, demo.x_test[:5]))
        assert server.metric("fhe_bento_key_uploads_total", model=LOGREG) == before


def test_cli_predicts_a_csv_file(server, demo, tmp_path):
    rows = demo.x_test[:12]
    data = tmp_path / "rows.csv"
    header = ",".join(f"feature_{i}" for i in range(rows.shape[1]))
    np.savetxt(data, rows, delimiter=",", header=header, comments="")
    cli = [
        str(Path(sys.executable).parent / "fhe-bento"),
        "predict",
        "--url",
        server.url,
        "--model",
        LOGREG,
        "--batch-size",
        "5",
    ]
    env = {**os.environ, "FHE_BENTO_CLIENT_CACHE": str(tmp_path / "cache")}
    labels = subprocess.run(
        [*cli, str(data), "-o", str(tmp_path / "out.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert labels.returncode == 0, labels.stderr
    assert [int(v) for v in (tmp_path / "out.csv").read_text().split()] == list(
        demo.clear_predict(LOGREG, rows)
    )
    proba = subprocess.run([*cli, "--proba", str(data)], env=env, capture_output=True, text=True, timeout=300)
    assert proba.returncode == 0, proba.stderr
    np.testing.assert_allclose(
        np.loadtxt(proba.stdout.splitlines(), delimiter=","),
        demo.models[LOGREG].predict_proba(rows, fhe="disable"),
        atol=1e-6,
    )


def test_the_served_process_holds_no_private_key(server, demo, client_cache):
    """The server's folders (BentoML home, key store, staging, model store) hold no private key file and
    nothing byte-equal to one, after clients uploaded keys and predicted; no server process has a file of
    the client's key folder open, or names it in its environment."""
    import psutil

    FHEClient(server.url, cache_dir=client_cache, progress=False).model(XGB).ensure_key()
    secrets = [p.read_bytes() for p in client_cache.rglob("secretKey*")]
    assert secrets
    for folder in (server.workdir, Path(os.environ["BENTOML_HOME"]) / "models"):
        for path in folder.rglob("*"):
            if path.is_file():
                assert not path.name.startswith("secretKey"), path
                if path.stat().st_size in {len(s) for s in secrets}:
                    assert path.read_bytes() not in secrets, path
    root = psutil.Process(server.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        assert not [f.path for f in proc.open_files() if str(client_cache) in f.path]
        assert not [v for v in proc.environ().values() if str(client_cache) in v]


def test_readyz_and_ping_agree_while_the_engine_loads_and_once_it_has(demo, tmp_path):
    """BentoML's /readyz (what Kubernetes or BentoCloud probe) and SageMaker's /ping give one answer: 503
    while the worker's engine processes load their models, 200 once they have. Each /readyz is followed at
    once by a /ping, so a ready /readyz followed by a not-ready /ping is a disagreement (readiness only
    grows while a server starts)."""
    from harness.devserver import Server

    srv = Server(
        tmp_path,
        {
            "FHE_BENTO_MODELS": f"{LOGREG}:latest",
            "FHE_BENTO_WORKERS": "1",
            "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(tmp_path / "staging"),
        },
        ready_path="/livez",  # up, engines not necessarily loaded
    )
    srv.start()
    try:
        pairs = []
        deadline = time.monotonic() + 180
        while not pairs or pairs[-1] != (200, 200):
            assert time.monotonic() < deadline, pairs[-5:]
            pairs.append(
                (httpx.get(f"{srv.url}/readyz").status_code, httpx.get(f"{srv.url}/ping").status_code)
            )
            time.sleep(0.05)
        assert (503, 503) in pairs  # the loading window was seen, and both said so
        assert set(pairs) <= {(503, 503), (503, 200), (200, 200)}, sorted(set(pairs))
        loaded = pairs.index((200, 200))
        assert all(pair == (200, 200) for pair in pairs[loaded:])
    finally:
        srv.stop()
