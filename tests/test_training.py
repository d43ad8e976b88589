"""Training sessions in process (docs/training.md): the service's app around a real `Runner` serving the
training demo (concrete-ml's encrypted SGD step), with two tenants' tokens and a key store of its own.
Steps are real FHE (seconds each), so each test takes few of them.

The app runs one engine process (FHE_BENTO_ROW_THREADS=1), so that every step is computed by one process:
concrete's FFT plans are chosen by measuring, per process, and concrete-ml compiles training circuits with
a 1 % error probability per table lookup, so two processes may decrypt one step to weights one
quantization step apart. Within one process a step is a pure function of its inputs, which the exactly-once
test below compares byte for byte."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import LOGREG, XGB, Training, assert_error, served_app
from fastapi.testclient import TestClient

from fhe_bento.client import FHEClient
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.client.training import Schedule, initial_weights
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, KEY_ID_HEADER, TRAINING_STEP_HEADER
from harness.simulated_training import simulated_weights

ALICE, BOB = "alice-predict-token", "bob-predict-token"
BATCH = {"Content-Type": wire.CONTENT_TYPE}


class Owner:
    """A data owner of the training demo: its concrete-ml client and keys, and its token's HTTP client."""

    def __init__(self, http: TestClient, training: Training, key_dir: Path) -> None:
        from concrete.ml.deployment import FHEModelClient

        self.http = http
        self.name = training.name
        self.fhe = FHEModelClient(str(training.dev_dir), key_dir=str(key_dir))
        self.fhe.generate_private_and_evaluation_keys()
        self.key = self.fhe.get_serialized_evaluation_keys()
        transport = HTTPTransport(str(http.base_url), client=http)
        self.key_id = transport.put_key(self.name, self.key, lambda _: None)["key_id"]

    def weights(self, seed: int = 3) -> list[bytes]:
        weights, bias = initial_weights(4, (-1.0, 1.0), seed)
        _, _, w, b = self.fhe.quantize_encrypt_serialize(None, None, weights, bias)
        return [w, b]

    def batch(self, x: np.ndarray, y: np.ndarray) -> list[bytes]:
        bx, by, _, _ = self.fhe.quantize_encrypt_serialize(
            x.reshape(1, len(x), -1), y.reshape(1, len(y), 1).astype(np.float64), None, None
        )
        return [bx, by]

    def start(self, values: list[bytes] | None = None, key_id: str | None = None):
        return self.http.post(
            f"/v1/models/{self.name}/trainings",
            content=wire.encode_batch(values or self.weights()),
            headers={**BATCH, KEY_ID_HEADER: key_id or self.key_id},
        )

    def step(self, training_id: str, step: int, body: bytes | list[bytes], **headers: str):
        content = body if isinstance(body, bytes) else wire.encode_batch(body)
        return self.http.post(
            f"/v1/models/{self.name}/trainings/{training_id}/steps",
            params={"step": step},
            content=content,
            headers={**BATCH, **headers},
        )

    def state(self, training_id: str) -> tuple[int, bytes]:
        """The session's step and its encrypted weights' bytes, as the server answers them."""
        response = self.http.get(f"/v1/models/{self.name}/trainings/{training_id}/weights")
        assert response.status_code == 200, response.text
        assert (
            int(response.headers[TRAINING_STEP_HEADER])
            == self.http.get(f"/v1/models/{self.name}/trainings/{training_id}").json()["step"]
        )
        return int(response.headers[TRAINING_STEP_HEADER]), response.content

    def decrypt(self, weights: bytes) -> tuple[np.ndarray, np.ndarray]:
        w, b = self.fhe.deserialize_decrypt_dequantize(*wire.decode_batch(weights, 2))
        return np.asarray(w), np.asarray(b)


@pytest.fixture(scope="module")
def served(training, demo, tmp_path_factory):
    """The app with the training demo, the logistic regression and the tiny XGB, tokens on."""
    from pydantic import SecretStr

    from fhe_bento.service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("training-app")
    settings = ServiceSettings(
        models=f"{training.name}:latest,{LOGREG}:latest,{XGB}:latest",
        key_store=(root / "keys").as_uri(),
        staging_dir=root / "staging",
        predict_tokens=SecretStr(f"{ALICE}, {BOB}"),
        admin_tokens=SecretStr("training-admin-token"),
        row_threads=1,
    )
    with served_app(settings) as (http, _):
        yield http


def as_tenant(http: TestClient, token: str) -> TestClient:
    return TestClient(http.app, base_url=str(http.base_url), headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def alice(served, training, tmp_path_factory) -> Owner:
    return Owner(as_tenant(served, ALICE), training, tmp_path_factory.mktemp("alice-keys"))


def test_the_listing_describes_the_training_circuit(alice: Owner, training: Training) -> None:
    listed = {m["name"]: m for m in alice.http.get("/v1/models").json()}
    model = listed[training.name]
    assert (model["training"], model["batch_size"], model["n_features"]) == (True, 4, 4)
    assert model["parameters_range"] == [-1.0, 1.0]
    assert "training" not in listed[LOGREG]


def test_steps_are_applied_exactly_once_to_the_held_weights(alice: Owner, training: Training) -> None:
    """Two served steps, a retry of the last one and a stale one; then the same two steps in a second
    session, and the last one again in a third session started from the first session's held weights after
    step 1: the weights are equal byte for byte each time. A step is a pure function of its batch and the
    weights the server held (one engine process computes them all, see the module's docstring), and the
    retry applied nothing."""
    x, y = training.data.x_train, training.data.y_train
    initial = alice.weights()
    started = alice.start(initial)
    assert started.status_code == 201, started.text
    training_id = started.json()["training_id"]
    assert started.json()["step"] == 0
    batches = [alice.batch(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) for k in range(2)]
    held_after = []
    for step, batch in enumerate(batches):
        answer = alice.step(training_id, step, batch)
        assert (answer.status_code, answer.json()) == (200, {"step": step + 1})
        held_after.append(alice.state(training_id))
    step, weights = held_after[-1]
    assert step == 2

    retried = alice.step(training_id, 1, batches[1])  # its answer was lost: sent again, same body
    assert (retried.status_code, retried.json()) == (200, {"step": 2})
    assert alice.state(training_id) == (2, weights)
    stale = alice.step(training_id, 1, alice.batch(x[4:8], y[4:8]))  # step 1 again, another batch
    assert_error(stale, 409, "step_conflict")
    assert "at step 2" in stale.json()["error"]["message"]
    assert alice.state(training_id) == (2, weights)

    again = alice.start(initial).json()["training_id"]
    for step, batch in enumerate(batches):
        assert alice.step(again, step, batch).status_code == 200
    assert alice.state(again) == (2, weights)
    resumed = alice.start(wire.decode_batch(held_after[0][1], 2)).json()["training_id"]
    assert alice.step(resumed, 0, batches[1]).status_code == 200
    assert alice.state(resumed)[1] == weights

    served_w, served_b = alice.decrypt(weights)
    assert served_w.shape == (1, 4, 1) and served_b.shape == (1, 1, 1)
    assert np.all(np.abs(served_w) <= 1.1) and np.all(np.abs(served_b) <= 1.1)  # the parameter range

    status = alice.http.get(f"/v1/models/{training.name}/trainings/{training_id}").json()
    assert (status["step"], status["key_id"], status["training_id"]) == (2, alice.key_id, training_id)
    assert status["created"] <= status["updated"]
    assert alice.http.delete(f"/v1/models/{training.name}/trainings/{training_id}").status_code == 204
    assert_error(
        alice.http.get(f"/v1/models/{training.name}/trainings/{training_id}"), 404, "unknown_training"
    )


def test_an_epoch_runs_its_batches_in_order_exactly_once(alice: Owner, training: Training) -> None:
    """An epoch (docs/training.md) gives the weights of its batches stepped one by one, byte for byte; sent
    again it applies nothing; after its first batch was applied alone (an attempt cut short), it goes on
    from there; an epoch that does not hold the applied batch at that place gets 409. The last one goes
    through `/invocations` as SageMaker's asynchronous endpoints forward it (`op=training_epoch`)."""
    x, y = training.data.x_train, training.data.y_train
    initial = alice.weights(seed=5)
    batches = [alice.batch(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) for k in (2, 3)]
    epoch = wire.encode_batch([value for batch in batches for value in batch])

    def run_epoch(training_id: str, body: bytes = epoch):
        return alice.http.post(
            f"/v1/models/{alice.name}/trainings/{training_id}/epochs",
            params={"step": 0},
            content=body,
            headers=BATCH,
        )

    one_by_one = alice.start(initial).json()["training_id"]
    for step, batch in enumerate(batches):
        assert alice.step(one_by_one, step, batch).status_code == 200
    reference = alice.state(one_by_one)

    whole = alice.start(initial).json()["training_id"]
    transport = HTTPTransport(str(alice.http.base_url), client=alice.http)
    assert transport.training_epoch(alice.name, whole, 0, batches) == {"step": 2}
    assert alice.state(whole) == reference
    assert run_epoch(whole).json() == {"step": 2} and alice.state(whole) == reference

    cut_short = alice.start(initial).json()["training_id"]
    assert alice.step(cut_short, 0, batches[0]).status_code == 200
    reordered = wire.encode_batch([*batches[1], *batches[0]])
    assert_error(run_epoch(cut_short, reordered), 409, "step_conflict")
    via_sagemaker = alice.http.post(
        "/invocations",
        content=epoch,
        headers={
            **BATCH,
            ATTRIBUTES_HEADER: f"op=training_epoch; model={alice.name}; training={cut_short}; step=0",
        },
    )
    assert (via_sagemaker.status_code, via_sagemaker.json()) == (200, {"step": 2})
    assert alice.state(cut_short) == reference
    assert_error(run_epoch(cut_short, wire.encode_batch(batches[0][:1])), 400, "invalid_batch")


@pytest.fixture(scope="module")
def session_at_zero(alice: Owner) -> str:
    answer = alice.start()
    assert answer.status_code == 201, answer.text
    return answer.json()["training_id"]


def _hostile_steps(alice: Owner, training: Training, logreg_row: bytes) -> list[tuple[str, object, int, str]]:
    x, y = training.data.x_train[:4], training.data.y_train[:4]
    bx, by = alice.batch(x, y)
    w, b = alice.weights()
    return [
        ("weights where a batch is expected", [w, b], 422, "ciphertext_mismatch"),
        ("x and y swapped", [by, bx], 422, "ciphertext_mismatch"),
        ("another model's ciphertext as x", [logreg_row, by], 422, "ciphertext_mismatch"),
        ("bytes of x's size that are no ciphertext", [b"\xff" * len(bx), by], 400, "invalid_ciphertext"),
        ("x alone", [bx], 400, "invalid_batch"),
        ("three values", [bx, by, by], 400, "invalid_batch"),
        ("no batch framing", bx, 400, "invalid_batch"),
    ]


def test_hostile_steps_get_documented_answers_and_leave_the_session_unchanged(
    alice: Owner, training: Training, session_at_zero: str, demo
) -> None:
    from concrete.ml.deployment import FHEModelClient

    logreg = FHEModelClient(str(demo.dev_dirs[LOGREG]), key_dir=str(alice.fhe.key_dir) + "-logreg")
    logreg.generate_private_and_evaluation_keys()
    logreg_row = logreg.quantize_encrypt_serialize(demo.x_test[:1])
    before = alice.state(session_at_zero)
    for what, body, status, code in _hostile_steps(alice, training, logreg_row):
        answer = alice.step(session_at_zero, 0, body)  # type: ignore[arg-type]
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), what
        assert alice.state(session_at_zero) == before, what
    good = alice.step(session_at_zero, 0, alice.batch(training.data.x_train[:4], training.data.y_train[:4]))
    assert good.status_code == 200  # the same session takes a good step after them all
    assert alice.state(session_at_zero)[0] == 1


def test_a_session_needs_this_models_key_and_weights(alice: Owner, training: Training, demo) -> None:
    """A key made for another model (registered there) is not this model's, and a batch is not weights."""
    from concrete.ml.deployment import FHEModelClient

    xgb = FHEModelClient(str(demo.dev_dirs[XGB]), key_dir=str(alice.fhe.key_dir) + "-xgb")
    xgb.generate_private_and_evaluation_keys()
    xgb_key = xgb.get_serialized_evaluation_keys()
    xgb_key_id = HTTPTransport(str(alice.http.base_url), client=alice.http).put_key(
        XGB, xgb_key, lambda _: None
    )
    assert_error(alice.start(key_id=xgb_key_id["key_id"]), 404, "unknown_key")
    upload = alice.http.post(
        f"/v1/models/{training.name}/keys",
        content=xgb_key,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert_error(upload, 422, "key_mismatch")
    batch = alice.batch(training.data.x_train[:4], training.data.y_train[:4])
    assert_error(alice.start(batch), 422, "ciphertext_mismatch")
    no_key = alice.http.post(
        f"/v1/models/{training.name}/trainings", content=wire.encode_batch(alice.weights()), headers=BATCH
    )
    assert_error(no_key, 400, "missing_key_id")


def test_another_tenant_gets_404(served, alice: Owner, training: Training) -> None:
    answer = alice.start()
    training_id = answer.json()["training_id"]
    before = alice.state(training_id)
    bob = as_tenant(served, BOB)
    base = f"/v1/models/{training.name}/trainings/{training_id}"
    batch = wire.encode_batch(alice.batch(training.data.x_train[:4], training.data.y_train[:4]))
    for answer in (
        bob.get(base),
        bob.get(f"{base}/weights"),
        bob.post(f"{base}/steps", params={"step": 0}, content=batch, headers=BATCH),
        bob.delete(base),
    ):
        assert_error(answer, 404, "unknown_training")
    assert_error(served.get(base), 401, "auth_required")
    assert alice.state(training_id) == before


def test_concurrent_steps_one_wins_the_other_gets_409(alice: Owner, training: Training) -> None:
    training_id = alice.start().json()["training_id"]
    x, y = training.data.x_train, training.data.y_train
    bodies = [alice.batch(x[:4], y[:4]), alice.batch(x[4:8], y[4:8])]
    answers: list = [None, None]

    def send(index: int) -> None:
        answers[index] = alice.step(training_id, 0, bodies[index])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [200, 409]
    loser = next(a for a in answers if a.status_code == 409)
    assert loser.json()["error"]["code"] == "step_conflict"
    assert alice.state(training_id)[0] == 1


def test_circuit_kinds_keep_to_their_routes(alice: Owner, training: Training, demo) -> None:
    row = alice.batch(training.data.x_train[:4], training.data.y_train[:4])
    answer = alice.http.post(
        f"/v1/models/{training.name}/predict_batch", content=wire.encode_batch(row), headers=BATCH
    )
    assert_error(answer, 400, "training_model")
    answer = alice.http.post(f"/v1/models/{LOGREG}/trainings", content=wire.encode_batch(row), headers=BATCH)
    assert_error(answer, 400, "not_training_model")


def test_fit_returns_a_classifier_of_the_decrypted_weights(
    alice: Owner, training: Training, tmp_path
) -> None:
    """`RemoteModel.fit` end to end in process: three steps, then scikit-learn's classifier of the decrypted
    weights; its session is deleted on the server and forgotten in the key folder."""
    client = FHEClient(
        transport=HTTPTransport(str(alice.http.base_url), client=alice.http),
        cache_dir=tmp_path,
        progress=False,
    )
    remote = client.model(training.name)
    x, y = training.data.x_train[:12], training.data.y_train[:12]
    model = remote.fit(x, y, epochs=1, seed=5)
    assert model.coef_.shape == (1, 4) and model.intercept_.shape == (1,)
    assert np.all(np.abs(model.coef_) <= 1.1)
    scores = training.data.x_test @ model.coef_.ravel() + model.intercept_[0]
    assert list(model.predict(training.data.x_test)) == list((scores > 0).astype(int))
    assert not list((remote.folder / "trainings").iterdir())  # nothing left to resume


def test_a_full_schedule_is_as_accurate_as_concrete_mls_simulation(training: Training) -> None:
    """Two epochs of the client's schedule (its batches and initial weights) over the training split,
    simulated, score within 5 points of concrete-ml's own `fit(fhe="simulate")` for as many steps, on the
    held-out split."""
    from fhe_bento.client.training import classifier
    from fhe_bento.modelkit.demo import training_estimator

    data = training.data
    schedule = Schedule(len(data.x_train), 4, 2, 0)
    weights, bias = simulated_weights(
        training.estimator, data.x_train, data.y_train, schedule, *initial_weights(4, (-1.0, 1.0), 0)
    )
    served = classifier(weights, bias).score(data.x_test, data.y_test)
    simulated = training_estimator(max_iter=schedule.steps).fit(data.x_train, data.y_train, fhe="simulate")
    assert abs(served - simulated.score(data.x_test, data.y_test)) <= 0.05
    assert served >= 0.85


def test_trained_weights_become_a_served_inference_model(alice: Owner, training: Training, tmp_path) -> None:
    """docs/training.md, "From trained weights to an FHE inference model": weights from served steps,
    decrypted, compiled as concrete-ml's LogisticRegression, imported and served; its decrypted predictions
    equal the compiled model's clear ones, row by row."""
    from concrete.ml.sklearn import LogisticRegression

    from fhe_bento.client.training import classifier
    from fhe_bento.modelkit.demo import save_dev_folder
    from fhe_bento.modelkit.importer import import_model
    from fhe_bento.service.settings import ServiceSettings

    data = training.data
    training_id = alice.start().json()["training_id"]
    assert alice.step(training_id, 0, alice.batch(data.x_train[:4], data.y_train[:4])).status_code == 200
    trained = classifier(*alice.decrypt(alice.state(training_id)[1]))

    inference = LogisticRegression.from_sklearn_model(trained, data.x_train, n_bits=8)
    inference.compile(data.x_train)
    import_model(save_dev_folder(inference, tmp_path / "trained"), "trained-logreg", classes=[0, 1])
    settings = ServiceSettings(
        models="trained-logreg:latest",
        key_store=(tmp_path / "keys").as_uri(),
        staging_dir=tmp_path / "staging",
    )
    with served_app(settings) as (http, _):
        client = FHEClient(
            transport=HTTPTransport(str(http.base_url), client=http), cache_dir=tmp_path / "c", progress=False
        )
        predicted = client.model("trained-logreg").predict(data.x_test[:8])
    np.testing.assert_array_equal(predicted, inference.predict(data.x_test[:8], fhe="disable"))
