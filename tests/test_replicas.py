"""Many replicas on one shared s3:// key store (moto's server mode over HTTP on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import httpx
import pytest
from conftest import LOGREG, XGB, imported_spec

from fhe_bento.client import FHEClient
from fhe_bento.client.http_transport import HTTPTransport
from fhe_bento.protocol.names import PART_BYTES
from harness.devserver import Server

BUCKET = "fhe-bento-keys"
OCTET = {"Content-Type": "application/octet-stream"}


def start_replica(workdir, store: str, **env: str) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
            "FHE_BENTO_KEY_STORE": store,
            "FHE_BENTO_STAGING_DIR": str(workdir / "staging"),
            **env,
        },
    )
    server.start()
    return server


@pytest.fixture(scope="module")
def replicas(demo, moto_url, tmp_path_factory):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("replicas")
    servers = [start_replica(root / f"r{i}", f"s3://{BUCKET}/shared") for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


def parts_of(key: bytes) -> list[bytes]:
    return [key[i : i + PART_BYTES] for i in range(0, len(key), PART_BYTES)]


def put_part(server: Server, key_id: str, index: int, data) -> httpx.Response:
    return httpx.put(
        f"{server.url}/v1/models/{XGB}/keys/{key_id}/parts/{index}", content=data, headers=OCTET, timeout=60
    )


def key_objects(key_id: str) -> list[dict]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="shared/keys/")
    return [o for o in listing.get("Contents", []) if o["Key"].endswith(f"{key_id}.key")]


def test_parts_alternating_between_replicas_make_a_key_usable_on_both(replicas, demo, tmp_path):
    remote = FHEClient(replicas[0].url, cache_dir=tmp_path, progress=False).model(XGB)
    key = remote.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    parts = parts_of(key)
    for index in reversed(range(len(parts))):  # any order, alternating replicas
        assert put_part(replicas[index % 2], key_id, index, parts[index]).status_code == 200
    for server in replicas:
        assert httpx.get(f"{server.url}/v1/models/{XGB}/keys/{key_id}/parts").json()["parts"] == list(
            range(len(parts))
        )
        assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 404  # not yet a key
    done = httpx.post(
        f"{replicas[1].url}/v1/models/{XGB}/keys/{key_id}/complete", params={"parts": len(parts)}, timeout=120
    )
    assert done.status_code == 201 and done.json() == {"key_id": key_id, "bytes": len(key)}

    (obj,) = key_objects(key_id)
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key=obj["Key"])
    assert head["ContentLength"] == len(key)
    assert head["Metadata"]["model"] == XGB and float(head["Metadata"]["created"]) > 0
    assert replicas[1].metric("fhe_bento_key_store_bytes", model=XGB) >= len(key)
    for i, server in enumerate(replicas):
        row = demo.x_test[100 + i : 101 + i]
        client = FHEClient(server.url, cache_dir=tmp_path, progress=False).model(XGB)
        assert client.predict(row)[0] == demo.clear_predict(XGB, row)[0]
    assert replicas[0].metric("fhe_bento_key_cache_total", model=XGB, result="miss") >= 1  # fetched from S3


def test_sigkill_mid_upload_leaves_no_partial_key_and_resume_sends_only_the_rest(replicas, demo, tmp_path):
    victim, survivor = replicas
    remote = FHEClient(survivor.url, cache_dir=tmp_path, progress=False).model(XGB)
    key = remote.evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    parts = parts_of(key)
    half = len(parts) // 2
    for index in range(half):
        assert put_part(victim, key_id, index, parts[index]).status_code == 200

    def slow_part():  # part `half` is still streaming in when the replica dies
        yield parts[half][:1024]
        time.sleep(3)
        yield parts[half][1024:]

    def send_slow_part() -> None:
        with pytest.raises(httpx.HTTPError):
            put_part(victim, key_id, half, slow_part())

    in_flight = threading.Thread(target=send_slow_part)
    in_flight.start()
    time.sleep(1.0)
    victim.kill()
    in_flight.join()

    assert httpx.head(f"{survivor.url}/v1/models/{XGB}/keys/{key_id}").status_code == 404
    assert not key_objects(key_id)
    held = httpx.get(f"{survivor.url}/v1/models/{XGB}/keys/{key_id}/parts").json()
    assert held["parts"] == list(range(half))  # the part cut off mid-stream was never stored

    sent_before = survivor.metric("fhe_bento_key_part_bytes_total", model=XGB)
    assert remote.ensure_key() == key_id  # the client asks what is held and resumes
    sent = survivor.metric("fhe_bento_key_part_bytes_total", model=XGB) - sent_before
    assert sent == sum(len(p) for p in parts[half:])
    row = demo.x_test[110:111]
    assert remote.predict(row)[0] == demo.clear_predict(XGB, row)[0]

    victim.start()  # back, and the key registered through the other replica works there too
    assert httpx.head(f"{victim.url}/v1/models/{XGB}/keys/{key_id}").status_code == 200


def test_concurrent_uploads_of_one_key_store_one_object(replicas, tmp_path):
    key = FHEClient(replicas[0].url, cache_dir=tmp_path, progress=False).model(XGB).evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()

    def upload(i: int) -> dict:
        return HTTPTransport(replicas[i % 2].url).put_key(XGB, key, lambda _: None)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(upload, range(4)))
    assert {a["key_id"] for a in answers} == {key_id}
    assert len(key_objects(key_id)) == 1
    uploads = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="shared/uploads/").get("Contents", [])
    assert not [o for o in uploads if key_id in o["Key"]]  # no parts left behind


def test_corrupted_part_is_refused_at_completion(replicas, tmp_path):
    key = FHEClient(replicas[0].url, cache_dir=tmp_path, progress=False).model(XGB).evaluation_key()
    key_id = hashlib.sha256(key).hexdigest()
    parts = parts_of(key)
    parts[2] = parts[2][:-1] + bytes([parts[2][-1] ^ 1])
    for index, part in enumerate(parts):
        put_part(replicas[index % 2], key_id, index, part)
    done = httpx.post(
        f"{replicas[0].url}/v1/models/{XGB}/keys/{key_id}/complete", params={"parts": len(parts)}
    )
    assert done.status_code == 400 and done.json()["error"]["code"] == "digest_mismatch"
    assert not key_objects(key_id)
    assert httpx.get(f"{replicas[1].url}/v1/models/{XGB}/keys/{key_id}/parts").json()["parts"] == []


@pytest.fixture(scope="module")
def limited(demo, moto_url, tmp_path_factory):
    """One replica with a 6 s TTL for unused keys and abandoned uploads, and room for one XGB key."""
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    server = start_replica(
        tmp_path_factory.mktemp("limited"),
        f"s3://{BUCKET}/limited",
        FHE_BENTO_KEY_TTL_SECONDS="6",
        FHE_BENTO_UPLOAD_TTL_SECONDS="6",
        FHE_BENTO_MAX_STORE_BYTES=str(int(1.5 * imported_spec(XGB).meta.eval_key_bytes)),
    )
    yield server
    server.stop()


def test_limits_ttl_and_one_transparent_reupload(limited, demo, tmp_path):
    url = limited.url
    remote = FHEClient(url, cache_dir=tmp_path / "a", progress=False).model(XGB)
    other_key = FHEClient(url, cache_dir=tmp_path / "b", progress=False).model(XGB).evaluation_key()
    key_id = remote.ensure_key()

    # Per-model store limit: a second key does not fit in 1.5 keys' room.
    full = HTTPTransport(url).http.post(f"/v1/models/{XGB}/keys", content=other_key, headers=OCTET)
    assert full.status_code == 413 and full.json()["error"]["code"] == "key_store_full"
    stray = hashlib.sha256(b"abandoned upload").hexdigest()
    assert (
        httpx.put(
            f"{url}/v1/models/{XGB}/keys/{stray}/parts/0", content=b"x" * 100, headers=OCTET
        ).status_code
        == 200
    )

    time.sleep(7)  # past the TTL: the key was not used, the upload was abandoned
    assert httpx.head(f"{url}/v1/models/{XGB}/keys/{key_id}").status_code == 404
    created = limited.metric("fhe_bento_key_uploads_total", model=XGB, outcome="created")
    row = demo.x_test[112:113]
    assert remote.predict(row)[0] == demo.clear_predict(XGB, row)[0]  # unknown_key -> upload -> retry
    assert limited.metric("fhe_bento_key_uploads_total", model=XGB, outcome="created") == created + 1
    assert httpx.get(f"{url}/v1/models/{XGB}/keys/{stray}/parts").json()["parts"] == []  # swept


def test_key_affinity_keeps_a_keys_predictions_on_one_replica_until_it_leaves(replicas, demo, tmp_path):
    """Real boto3 against a stand-in for SageMaker's routing of stateful sessions: the first prediction opens
    a session on a random replica, the next ones reach that replica (where the key is warm), and once it has
    left the endpoint the client opens a new session on the other."""
    from harness.sagemaker_balancer import Balancer

    with Balancer([r.url for r in replicas], seed=1) as balancer:
        runtime = boto3.client("sagemaker-runtime", endpoint_url=balancer.url)
        client = FHEClient.sagemaker("fhe-bento", runtime_client=runtime, cache_dir=tmp_path, progress=False)
        xgb = client.model(XGB)
        key_id = xgb.ensure_key()
        misses = {r.url: r.metric("fhe_bento_key_cache_total", model=XGB, result="miss") for r in replicas}
        for i in range(3):
            row = demo.x_test[60 + i : 61 + i]
            assert xgb.predict(row)[0] == demo.clear_predict(XGB, row)[0]
        ((home, count),) = balancer.counts("predict_batch").items()
        assert count == 3
        session = client.transport.sessions[key_id]
        carried = [r.session for r in balancer.routed if "op=predict_batch" in r.attributes]
        assert carried == ["NEW_SESSION", session.id, session.id]
        by_url = {r.url: r for r in replicas}
        assert by_url[home].metric("fhe_bento_key_cache_total", model=XGB, result="miss") - misses[home] <= 1
        (away,) = set(by_url) - {home}
        assert by_url[away].metric("fhe_bento_key_cache_total", model=XGB, result="miss") == misses[away]

        balancer.remove(home)  # SageMaker replaced that instance: its sessions are refused
        row = demo.x_test[63:64]
        assert xgb.predict(row)[0] == demo.clear_predict(XGB, row)[0]
        assert balancer.counts("predict_batch")[away] == 1
        assert client.transport.sessions[key_id].id != session.id
        assert balancer.routed[-1].session == "NEW_SESSION"
