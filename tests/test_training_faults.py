"""Training sessions across real `bentoml serve` processes on one key store: a server killed between two
steps and in the middle of one, a client's `fit` carried across a kill, and two replicas taking turns.

A step is a pure function of its batch and the held weights within one engine process, but two processes
may compute one step a quantization step apart (concrete measures its FFT plans per process, and
concrete-ml's training circuits accept a 1 % error per table lookup; tests/test_training.py). So "the same
final weights as an uninterrupted run" is checked against a reference session that starts from the durable
weights the interrupted one resumed from and runs the same batches on the same engine: byte for byte."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import Training
from test_training import Owner

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire
from harness.devserver import Server


def start_server(workdir: Path, store: Path, name: str) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{name}:latest",
            "FHE_BENTO_KEY_STORE": store.as_uri(),
            "FHE_BENTO_STAGING_DIR": str(workdir / "staging"),
            "FHE_BENTO_ROW_THREADS": "1",  # one engine: every step of a server in one process
        },
    )
    server.start()
    return server


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def step_in_flight(server: Server) -> bool:
    return server.metric("fhe_bento_queue_rows") == 1


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training-store")


@pytest.fixture(scope="module")
def server(training: Training, store: Path, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("training-server"), store, training.name)
    yield srv
    if srv.proc is not None:
        srv.stop()


@pytest.fixture(scope="module")
def owner(server: Server, training: Training, tmp_path_factory) -> Owner:
    return Owner(
        httpx.Client(base_url=server.url, timeout=600), training, tmp_path_factory.mktemp("owner-keys")
    )


def test_a_kill_between_steps_and_mid_step_loses_nothing(
    server: Server, owner: Owner, training: Training
) -> None:
    x, y = training.data.x_train, training.data.y_train
    batches = [owner.batch(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) for k in range(4)]
    training_id = owner.start().json()["training_id"]
    for step in range(2):
        assert owner.step(training_id, step, batches[step]).status_code == 200
    before = owner.state(training_id)

    server.kill()  # between steps 1 and 2
    server.start()
    assert owner.state(training_id) == before

    answers: list = []
    sender = threading.Thread(
        target=lambda: answers.append(_step_or_error(owner, training_id, 2, batches[2]))
    )
    sender.start()
    wait_for(lambda: step_in_flight(server), "step 2 in flight")
    server.kill()  # in the middle of step 2
    sender.join()
    assert isinstance(answers[0], httpx.TransportError)
    server.start()
    assert owner.state(training_id) == before  # the session is still at step 2, its weights untouched

    for step in (2, 3):
        assert owner.step(training_id, step, batches[step]).json() == {"step": step + 1}
    reference = owner.start(wire.decode_batch(before[1], 2)).json()["training_id"]
    for step in (0, 1):
        assert owner.step(reference, step, batches[step + 2]).status_code == 200
    assert owner.state(training_id)[1] == owner.state(reference)[1]


def _step_or_error(owner: Owner, training_id: str, step: int, batch: list[bytes]):
    try:
        return owner.step(training_id, step, batch)
    except httpx.TransportError as exc:
        return exc


def test_fit_carries_on_across_a_kill(server: Server, owner: Owner, training: Training, tmp_path) -> None:
    """`fit` in a thread while the server is killed in the middle of a step and started again: it
    reconnects, resumes from the session's step and returns the classifier; the session is gone after."""
    client = FHEClient(server.url, cache_dir=tmp_path, progress=False)
    remote = client.model(training.name)
    x, y = training.data.x_train[:16], training.data.y_train[:16]
    with ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(remote.fit, x, y, epochs=1, seed=7)
        records = remote.folder / "trainings"
        wait_for(lambda: records.is_dir() and any(records.iterdir()), "the fit's session record")
        (record,) = records.iterdir()
        training_id = json.loads(record.read_text())["training_id"]
        status = f"/v1/models/{training.name}/trainings/{training_id}"
        wait_for(
            lambda: owner.http.get(status).json()["step"] >= 1 and step_in_flight(server), "step 1 in flight"
        )
        server.kill()
        time.sleep(1)
        server.start()
        model = fitting.result(timeout=600)
    assert model.coef_.shape == (1, 4)
    assert owner.http.get(status).json()["error"]["code"] == "unknown_training"  # deleted at the end
    assert not any(records.iterdir())
    steps = [json.loads(line) for line in server.log().splitlines() if '"event":"training_step"' in line]
    applied = [s["step"] for s in steps if s["training_id"] == training_id and s["status"] == 200]
    assert set(applied) == {0, 1, 2, 3}


def test_two_replicas_take_turns_and_race(
    server: Server, owner: Owner, training: Training, store: Path, tmp_path_factory
) -> None:
    """Steps alternate between two servers on one key store: the same weights as a second session that
    alternates the same way; two different steps sent to both at once: one 200, one 409."""
    other = start_server(tmp_path_factory.mktemp("training-replica"), store, training.name)
    try:
        replicas = [owner.http, httpx.Client(base_url=other.url, timeout=600)]
        x, y = training.data.x_train, training.data.y_train
        batches = [owner.batch(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) for k in range(3)]
        initial = owner.weights()
        sessions = [owner.start(initial).json()["training_id"] for _ in range(2)]
        for training_id in sessions:
            for step, batch in enumerate(batches):
                owner.http = replicas[step % 2]
                assert owner.step(training_id, step, batch).json() == {"step": step + 1}
        owner.http = replicas[0]
        assert owner.state(sessions[0]) == owner.state(sessions[1])

        racing = [owner.batch(x[12:16], y[12:16]), owner.batch(x[16:20], y[16:20])]

        def send(index: int):
            client = replicas[index]
            return client.post(
                f"/v1/models/{training.name}/trainings/{sessions[0]}/steps",
                params={"step": 3},
                content=wire.encode_batch(racing[index]),
                headers={"Content-Type": wire.CONTENT_TYPE},
            )

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(send, range(2)))
        assert sorted(a.status_code for a in answers) == [200, 409]
        assert next(a for a in answers if a.status_code == 409).json()["error"]["code"] == "step_conflict"
        assert owner.state(sessions[0])[0] == 4
    finally:
        owner.http = replicas[0]
        other.stop()


@pytest.fixture(scope="module")
def client_cache(tmp_path_factory) -> Path:
    """One key cache for the client tests below: their keys are made and uploaded once."""
    return tmp_path_factory.mktemp("training-client-cache")


def test_fit_through_the_sagemaker_transport(server: Server, training: Training, client_cache: Path) -> None:
    """`fit` over `/invocations` as SageMaker forwards it (the container's contract, without SigV4)."""
    from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport

    client = FHEClient(
        transport=SageMakerTransport(LocalInvoker(server.url)), cache_dir=client_cache, progress=False
    )
    model = client.model(training.name).fit(training.data.x_train[:8], training.data.y_train[:8], seed=2)
    assert model.coef_.shape == (1, 4)
    steps = [json.loads(line) for line in server.log().splitlines() if '"event":"training_step"' in line]
    assert [s["status"] for s in steps[-2:]] == [200, 200]


def test_fit_through_an_asynchronous_endpoint_sends_whole_epochs(
    server: Server, training: Training, client_cache: Path, moto_url: str, tmp_path: Path
) -> None:
    """`fit` over a SageMaker asynchronous endpoint: real boto3 (`invoke_endpoint_async`), bodies and
    answers through S3 (moto's server mode), delivered to the server's `/invocations` by the stand-in for
    SageMaker's asynchronous inference (`harness.sagemaker_balancer`). The key goes once, on its own; then
    each epoch is one request (`training_epoch`), and the server applies its steps."""
    import boto3

    from fhe_bento.modelkit.sagemaker_deploy import model_folders_from_store, write_model_dir
    from harness.sagemaker_balancer import Balancer

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fhe-bento-async-training")
    models = write_model_dir(model_folders_from_store([f"{training.name}:latest"]), tmp_path / "model")
    with Balancer([server.url], output_path="s3://fhe-bento-async-training/out") as endpoint:
        client = FHEClient.sagemaker(
            "fhe-async",
            mode="async",
            input_prefix="s3://fhe-bento-async-training/in",
            models=models,
            runtime_client=boto3.client("sagemaker-runtime", endpoint_url=endpoint.url),
            cache_dir=client_cache,
            progress=False,
        )
        model = client.model(training.name).fit(
            training.data.x_train[:8], training.data.y_train[:8], epochs=2, seed=4
        )
    assert model.coef_.shape == (1, 4)
    assert endpoint.counts("training_epoch") == {server.url: 2}  # two epochs, one request each
    assert endpoint.counts("training_step") == {}
    assert endpoint.counts("put_key") == {server.url: 1}
    session = [json.loads(line) for line in server.log().splitlines() if '"event":"training_step"' in line]
    assert [(s["step"], s["status"]) for s in session[-4:]] == [(0, 200), (1, 200), (2, 200), (3, 200)]


def test_the_train_command_trains_from_a_csv(
    server: Server, training: Training, client_cache: Path, tmp_path, monkeypatch
) -> None:
    from click.testing import CliRunner

    from fhe_bento.client.cli import main

    monkeypatch.setenv("FHE_BENTO_CLIENT_CACHE", str(client_cache))
    table = tmp_path / "train.csv"
    rows = [[*x, y] for x, y in zip(training.data.x_train[:8], training.data.y_train[:8], strict=True)]
    table.write_text("f1,f2,f3,f4,label\n" + "\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--url",
            server.url,
            "--model",
            training.name,
            "--seed",
            "3",
            "-o",
            str(tmp_path / "w.json"),
            str(table),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "w.json").read_text())
    assert len(trained["coef"]) == 4 and isinstance(trained["intercept"], float)
