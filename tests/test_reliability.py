"""Bounded load and fault test: clients send valid and invalid requests to two replicas sharing a key
store while one replica is SIGKILLed and restarted mid-run (scenario: harness/loadfault.py). Nothing
accepted is lost, no answer is a 5xx, every 200 decrypts correctly, and memory is back near its start."""

from __future__ import annotations

import httpx
import pytest
from conftest import LOGREG, XGB

from fhe_bento.client import FHEClient
from harness import loadfault
from harness.devserver import Server

ROUNDS = 4


@pytest.fixture(scope="module")
def replicas(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    env = {
        "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
        "FHE_BENTO_KEY_STORE": (root / "keys").as_uri(),
    }
    servers = [Server(root / name, env) for name in ("a", "b")]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def test_load_with_a_replica_killed_loses_nothing(replicas, demo, tmp_path):
    owners = []
    for i in range(3):
        client = FHEClient(replicas[0].url, cache_dir=tmp_path / f"owner{i}", progress=False)
        owners.append(loadfault.Owner(keyed=client.model(XGB), keyless=client.model(LOGREG)))
    x = demo.x_test[:8]
    outcome = loadfault.run(replicas, victim=replicas[1], owners=owners, x=x, rounds=ROUNDS)

    assert not [answer for answer in outcome.answers if answer.startswith("5")], outcome.answers
    # Every invalid request got its documented code, once per round and client.
    for answer in (
        "400 invalid_ciphertext",
        "400 invalid_key",
        "415 unsupported_media_type",
        "404 unknown_key",
        "400 invalid_batch",
        "404 unknown_model",
    ):
        assert outcome.answers[answer] == ROUNDS * len(owners), (answer, outcome.answers)
    assert replicas[1].log().count("Starting production") == 2  # the victim really died and came back

    # Every key accepted is registered on both replicas and usable through the restarted one.
    assert len(outcome.accepted_keys) == len(owners)
    for owner in owners:
        key_id = owner.keyed.ensure_key()
        assert (XGB, key_id) in outcome.accepted_keys
        for server in replicas:
            assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 200
        answer = httpx.post(
            f"{replicas[1].url}/v1/models/{XGB}/predict",
            content=owner.keyed.encrypt(x[5:6])[0],
            headers={"Content-Type": "application/octet-stream", "X-FHE-Key-Id": key_id},
            timeout=600,
        )
        assert (
            owner.keyed.labels(owner.keyed.decrypt(answer.content)[None, :])[0]
            == demo.clear_predict(XGB, x[5:6])[0]
        )

    # Every 200 prediction decrypts to the model's own clear prediction of its row.
    assert len(outcome.predictions) >= len(owners) * ROUNDS * 3
    for model, row, answer in outcome.predictions:
        label = model.labels(model.decrypt(answer)[None, :])[0]
        assert label == demo.clear_predict(model.name, x[row : row + 1])[0], (model.name, row)

    # The survivor's memory is back near where it was once warm (every key cached).
    assert outcome.rss_after < outcome.rss_before * 1.25, (outcome.rss_before, outcome.rss_after)
