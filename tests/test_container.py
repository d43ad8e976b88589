"""The SageMaker container contract, on the real image: built once per run with buildah (from a locally
made Debian base), run with podman exactly as SageMaker runs it, called only on /ping and /invocations."""

from __future__ import annotations

import hashlib
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from conftest import LOGREG, REAL_XGB_CIPHERTEXT, XGB, real_body

from fhe_bento.client import FHEClient
from fhe_bento.client.sagemaker_transport import LocalInvoker, SageMakerTransport
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import PART_BYTES
from harness.container import RUN, URL, invoke, running, wait_for_ping


@pytest.fixture(scope="module")
def container(image, model_dir):
    with running(image, model_dir) as name:
        yield name


def test_ping_is_200_with_empty_body_once_loaded(container):
    response = wait_for_ping()
    assert response.content == b""
    models = {m["name"] for m in invoke("op=list_models").json()}
    assert models == {XGB, LOGREG}  # loaded from /opt/ml/model


def test_image_has_no_compilers_or_git(image):
    probe = subprocess.run(
        [
            *RUN,
            "--rm",
            "--entrypoint",
            "sh",
            image,
            "-c",
            "for tool in gcc g++ cc c++ make git ld; do command -v $tool || true; done",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [Path(p).name for p in probe.stdout.split()] == ["ld"]  # concrete links circuits at load


def test_invocations_only_client_uploads_key_in_parts_and_decrypts(container, demo, tmp_path):
    wait_for_ping()
    transport = SageMakerTransport(LocalInvoker(URL))
    client = FHEClient(transport=transport, cache_dir=tmp_path, progress=False, batch_size=2)
    xgb = client.model(XGB)
    key = xgb.evaluation_key()
    assert len(key) > 3 * PART_BYTES  # so the upload really goes in parts, as on SageMaker real time
    key_id = xgb.ensure_key()
    assert key_id == hashlib.sha256(key).hexdigest() and transport.has_key(XGB, key_id)

    rows = demo.x_test[80:82]
    assert list(xgb.predict(rows)) == list(demo.clear_predict(XGB, rows))
    rows = demo.x_test[:20]
    assert list(client.model(LOGREG).predict(rows)) == list(demo.clear_predict(LOGREG, rows))


def test_the_served_container_holds_no_private_key(container):
    """After clients uploaded keys and predicted (tests above), nothing in the container is a private key
    file, and the only host folder it sees is the read-only model folder."""
    probe = subprocess.run(
        [
            "podman",
            "exec",
            container,
            "sh",
            "-c",
            "find / \\( -path /proc -o -path /sys \\) -prune -o -name 'secretKey*' -print; "
            "echo MOUNTS; cat /proc/mounts",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found, mounts = probe.stdout.split("MOUNTS\n")
    assert found.strip() == ""
    host_mounts = [
        line.split()[1]
        for line in mounts.splitlines()
        if line.split()[1].startswith(("/opt", "/home", "/root", "/tmp", "/work"))
    ]
    assert (
        host_mounts == ["/opt/ml/model"]
        and " /opt/ml/model " in mounts
        and "ro," in next(line for line in mounts.splitlines() if line.split()[1] == "/opt/ml/model")
    )


@pytest.mark.parametrize(
    ("attributes", "body", "status", "code"),
    [
        (f"op=predict; model={LOGREG}", b"\x00garbage", 400, "invalid_ciphertext"),
        (f"op=predict; model={XGB}; key={'1' * 64}", REAL_XGB_CIPHERTEXT, 404, "unknown_key"),
        (f"op=put_key; model={XGB}", b"not a key" * 100, 400, "invalid_key"),
        (f"op=predict_batch; model={LOGREG}", b"FHB1\x00", 400, "invalid_batch"),
        ("op=nope", b"x", 400, "invalid_attributes"),
        ("op=predict; model=missing", b"x", 404, "unknown_model"),
    ],
)
def test_bad_invocations_get_documented_errors(container, demo, tmp_path, attributes, body, status, code):
    wait_for_ping()
    response = invoke(attributes, real_body(body, demo, tmp_path))
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert httpx.get(f"{URL}/ping", timeout=10).status_code == 200


def test_async_envelope_answered_by_the_container(container, demo, tmp_path, moto_url):
    """The async client puts an envelope in S3 (moto); the container answers it as SageMaker would
    deliver it; that answer replaces moto's canned result, and the client reads and decrypts it."""
    wait_for_ping()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fhe-bento-async")
    client = FHEClient.sagemaker(
        "fhe-async",
        mode="async",
        input_prefix="s3://fhe-bento-async/in",
        models=model_dir_of(container),
        cache_dir=tmp_path,
        progress=False,
    )
    remote = client.model(XGB)
    key_id = remote.ensure_key()  # async: held back and sent inline in the envelope
    rows = demo.x_test[90:92]
    job = remote.transport.submit(XGB, key_id, remote.encrypt(rows))

    (obj,) = s3.list_objects_v2(Bucket="fhe-bento-async", Prefix="in/")["Contents"]
    envelope = s3.get_object(Bucket="fhe-bento-async", Key=obj["Key"])["Body"].read()
    assert len(envelope) > len(remote.evaluation_key())  # the key travelled inline
    answer = invoke(f"op=envelope; model={XGB}", envelope, "application/vnd.fhe-bento.envelope")
    assert answer.status_code == 200, answer.text
    out_bucket, out_key = job.output_location[len("s3://") :].split("/", 1)
    s3.put_object(Bucket=out_bucket, Key=out_key, Body=answer.content)

    labels = [
        int(remote.fhe.deserialize_decrypt_dequantize(r).argmax())
        for r in job.result(poll=0.1, progress=False)
    ]
    assert labels == list(demo.clear_predict(XGB, rows))
    assert invoke(f"op=has_key; model={XGB}; key={key_id}").json()["registered"] is True


def model_dir_of(container: str) -> Path:
    mounts = subprocess.run(
        ["podman", "inspect", "--format", "{{range .Mounts}}{{.Source}}{{end}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(mounts)


def _queued_rows() -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{URL}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fhe_bento_queue_rows"
    )


def test_sigterm_drains_the_container_then_stops_it_cleanly(container, demo, tmp_path):
    """`podman stop -t 30` sends SIGTERM to the container's PID 1 and SIGKILLs after 30 s, as SageMaker
    does. The entrypoint passes the signal on (it `exec`s `bentoml serve`), so the server drains: `/ping`
    503 `draining` at once, a new request 503 `draining`, the rows in flight answered; and exit code 0
    means it then shut down by itself, inside the 30 s (docs/operations.md, "Drain on SIGTERM")."""
    wait_for_ping()
    xgb = FHEClient(
        transport=SageMakerTransport(LocalInvoker(URL)), cache_dir=tmp_path, progress=False
    ).model(XGB)
    key_id = xgb.ensure_key()
    rows = demo.x_test[:6]  # seconds of FHE on the image's engine: still running at SIGTERM
    body = wire.encode_batch(xgb.encrypt(rows))
    with ThreadPoolExecutor(2) as pool:
        batch = pool.submit(invoke, f"op=predict_batch; model={XGB}; key={key_id}", body, wire.CONTENT_TYPE)
        deadline = time.monotonic() + 60  # only stops a broken run from hanging
        while _queued_rows() < len(rows):  # the batch is in flight in the server
            assert time.monotonic() < deadline and not batch.done(), "the batch never got in flight"
            time.sleep(0.05)
        stop = pool.submit(
            subprocess.run, ["podman", "stop", "-t", "30", container], check=True, capture_output=True
        )
        deadline = time.monotonic() + 20  # only stops a broken run from hanging
        while (ping := httpx.get(f"{URL}/ping", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "/ping stayed 200 after SIGTERM"
            time.sleep(0.05)
        assert ping.status_code == 503 and ping.json()["error"]["code"] == "draining"
        refused = invoke(f"op=predict_batch; model={XGB}; key={key_id}", body, wire.CONTENT_TYPE)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        answered = batch.result(timeout=120)
        assert answered.status_code == 200, answered.text
        decrypted = [xgb.decrypt(a) for a in wire.decode_batch(answered.content, len(rows))]
        assert list(xgb.labels(np.vstack(decrypted))) == list(demo.clear_predict(XGB, rows))
        stop.result(timeout=60)
    state = subprocess.run(
        ["podman", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert state == ["exited", "0"]
