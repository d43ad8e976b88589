"""SageMaker transports: the same `Transport` interface as HTTP, over `/invocations`.

- `SageMakerTransport` (real time): each operation is one `invoke_endpoint` with
  `CustomAttributes="op=...; model=...; key=..."`. Keys over one part go in resumable 5 MiB parts, so a
  60-80 MB key fits SageMaker's 6 MB request limit. Predictions of one key run in a stateful session
  (key affinity): the first opens it, later ones carry its id so that they reach the instance where the key
  is warm, and one whose session is refused (its instance is gone, or it ended) opens a new one anywhere.
- `AsyncSageMakerTransport`: an async endpoint accepts only `invoke_endpoint_async`, so every batch is an
  envelope in S3 (with the evaluation key inline until one job has registered it), and the answer is
  polled from the output location. Model facts come from the model folders (a local copy, or the
  deployed `model.tar.gz` in S3) because an async endpoint cannot answer metadata queries.

Error answers and batch framing are `client/answers.py`'s, retries `client/retry.py`'s: no transport
here retries a failed answer (a refused session is opened anew, which is key affinity: `_in_session`).
Credentials and region come from boto3's usual chain; `AWS_ENDPOINT_URL` points boto3 elsewhere.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

from tqdm.auto import tqdm

from fhe_bento.client.answers import (
    MODEL_ERROR,
    FHEServiceError,
    batch_answer,
    error_from_body,
    exchange_batch,
    raise_for_error,
)
from fhe_bento.client.http_transport import http_client
from fhe_bento.client.uploads import upload_key
from fhe_bento.protocol import keys, wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, OCTET_STREAM, PART_BYTES
from fhe_bento.protocol.sessions import NEW_SESSION, SESSION_HEADER, Session, parse_session


def attributes(**fields: object) -> str:
    return "; ".join(f"{name}={value}" for name, value in fields.items() if value is not None)


def _model_error(status: int, body: bytes | str) -> FHEServiceError:
    """A container's error as SageMaker reports it (ModelError), or an async job's failure."""
    return error_from_body(status, body, MODEL_ERROR)


class Reply(NamedTuple):
    body: bytes
    new_session: str | None = None  # the container's `<id>; Expires=<time>` for a NEW_SESSION request


class Invoker(Protocol):
    def __call__(
        self, body: bytes, custom_attributes: str, content_type: str, session_id: str | None = None
    ) -> Reply: ...


class RuntimeInvoker:
    """`sagemaker-runtime.invoke_endpoint`; a container 4xx/5xx comes back as ModelError (HTTP 424).
    SageMaker itself refuses a session whose instance is gone (ValidationError): that is `invalid_session`,
    as the container says of a session that ended."""

    def __init__(self, endpoint_name: str, runtime_client: Any = None) -> None:
        import boto3

        self.endpoint_name = endpoint_name
        self.runtime = runtime_client or boto3.client("sagemaker-runtime")

    def __call__(
        self, body: bytes, custom_attributes: str, content_type: str, session_id: str | None = None
    ) -> Reply:
        from botocore.exceptions import ClientError

        try:
            response = self.runtime.invoke_endpoint(
                EndpointName=self.endpoint_name,
                Body=body,
                ContentType=content_type,
                CustomAttributes=custom_attributes,
                **({"SessionId": session_id} if session_id else {}),
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if session_id and error.get("Code") == "ValidationError":
                raise FHEServiceError(400, "invalid_session", error.get("Message", "")) from None
            info = exc.response.get("OriginalMessage") or error.get("Message", "")
            raise _model_error(int(exc.response.get("OriginalStatusCode", 424)), info) from None
        return Reply(response["Body"].read(), response.get("NewSessionId"))


class LocalInvoker:
    """What SageMaker forwards to the container, sent straight to it: `POST {url}/invocations` with the
    custom attributes header and no SigV4. For a container run locally (`podman run ... serve`)."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.http = http_client(url, timeout)

    def __call__(
        self, body: bytes, custom_attributes: str, content_type: str, session_id: str | None = None
    ) -> Reply:
        headers = {"Content-Type": content_type, ATTRIBUTES_HEADER: custom_attributes}
        response = self.http.post(
            "/invocations",
            content=body,
            headers={**headers, **({SESSION_HEADER: session_id} if session_id else {})},
        )
        raise_for_error(response, MODEL_ERROR)
        return Reply(response.content, response.headers.get(SESSION_HEADER))


OPENING_LOCKS = 16


class TrainingOps(ABC):
    """The training-session ops of `/invocations` (docs/sagemaker.md), over a transport's `exchange`: one
    invocation, its answer's body."""

    whole_epochs = False  # whether `fit` sends an epoch a request (`training_epoch`) rather than a step

    @abstractmethod
    def exchange(self, body: bytes, attrs: str, content_type: str) -> bytes: ...

    def start_training(self, name: str, key_id: str | None, weights: list[bytes]) -> dict[str, Any]:
        attrs = attributes(op="start_training", model=name, key=key_id)
        return dict(json.loads(self.exchange(wire.encode_batch(weights), attrs, wire.CONTENT_TYPE)))

    def training_step(self, name: str, training_id: str, step: int, batch: list[bytes]) -> dict[str, Any]:
        attrs = attributes(op="training_step", model=name, training=training_id, step=step)
        return dict(json.loads(self.exchange(wire.encode_batch(batch), attrs, wire.CONTENT_TYPE)))

    def training_epoch(
        self, name: str, training_id: str, step: int, batches: list[list[bytes]]
    ) -> dict[str, Any]:
        attrs = attributes(op="training_epoch", model=name, training=training_id, step=step)
        body = wire.encode_batch([value for batch in batches for value in batch])
        return dict(json.loads(self.exchange(body, attrs, wire.CONTENT_TYPE)))

    def training_status(self, name: str, training_id: str) -> dict[str, Any]:
        attrs = attributes(op="training_status", model=name, training=training_id)
        return dict(json.loads(self.exchange(b"{}", attrs, "application/json")))

    def training_weights(self, name: str, training_id: str) -> tuple[list[bytes], int]:
        attrs = attributes(op="training_weights", model=name, training=training_id)
        values = wire.decode_batch(self.exchange(b"{}", attrs, "application/json"), 3)
        return values[1:], int(values[0])  # the step leads: SageMaker returns no custom response header

    def delete_training(self, name: str, training_id: str) -> None:
        self.exchange(
            b"{}", attributes(op="delete_training", model=name, training=training_id), "application/json"
        )


class SageMakerTransport(TrainingOps):
    """Real-time endpoint transport. `key_affinity=False` sends no session ids: SageMaker then routes
    every request to any instance."""

    def __init__(self, invoke: Invoker, part_bytes: int = PART_BYTES, key_affinity: bool = True) -> None:
        self.invoke = invoke
        self.part_bytes = part_bytes
        self.key_affinity = key_affinity
        self.sessions: dict[str, Session] = {}  # key id -> its open session
        # Striped by key id: a fixed number of locks however many keys come and go.
        self._opening = [threading.Lock() for _ in range(OPENING_LOCKS)]
        self._lock = threading.Lock()

    def _json(self, **attrs: object) -> Any:
        return json.loads(self.invoke(b"{}", attributes(**attrs), "application/json").body)

    def list_models(self) -> list[dict[str, Any]]:
        return self._json(op="list_models")

    def get_model(self, name: str) -> dict[str, Any]:
        return self._json(op="get_model", model=name)

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        return self.invoke(b"{}", attributes(op="get_client", model=name), "application/json").body, ""

    def has_key(self, name: str, key_id: str) -> bool:
        return bool(self._json(op="has_key", model=name, key=key_id)["registered"])

    def set_default_version(self, name: str, version: str) -> dict[str, Any]:
        """Admin (IAM on the endpoint): `version` serves requests naming `name` alone."""
        return self._json(op="set_default", model=name, version=version)

    def retire_version(self, name: str, version: str) -> dict[str, Any]:
        """Admin: requests naming `version` get 410 version_retired from now on."""
        return self._json(op="retire", model=name, version=version)

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict[str, Any]:
        return upload_key(self, name, key, self.part_bytes, on_progress)

    def put_whole_key(self, name: str, key: bytes) -> dict[str, Any]:
        return json.loads(self.invoke(key, attributes(op="put_key", model=name), OCTET_STREAM).body)

    def key_parts(self, name: str, key_id: str) -> list[int]:
        return self._json(op="key_parts", model=name, key=key_id)["parts"]

    def put_key_part(self, name: str, key_id: str, index: int, data: bytes) -> None:
        self.invoke(data, attributes(op="put_key_part", model=name, key=key_id, part=index), OCTET_STREAM)

    def complete_key(self, name: str, key_id: str, count: int) -> dict[str, Any]:
        return self._json(op="complete_key", model=name, key=key_id, parts=count)

    def exchange(self, body: bytes, attrs: str, content_type: str) -> bytes:
        return self.invoke(body, attrs, content_type).body

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        attrs = attributes(op="predict_batch", model=name, key=key_id)

        def send(body: bytes) -> bytes:
            if key_id and self.key_affinity:
                return self._in_session(key_id, body, attrs)
            return self.invoke(body, attrs, wire.CONTENT_TYPE).body

        return exchange_batch(rows, send)

    def _in_session(self, key_id: str, body: bytes, attrs: str) -> bytes:
        """The answer sent in the key's session: its open one, or else one opened now. A refused session
        is opened anew (on any instance) before any answer to the request: that is session affinity, not a
        retry of a failed answer, which only the client's `RetryPolicy` makes."""
        opening = self._opening[hash(key_id) % OPENING_LOCKS]
        if (answer := self._in_known_session(key_id, body, attrs)) is not None:
            return answer
        # One request per key opens its session; the others of this key wait for it rather than each
        # opening one on another instance.
        with opening:
            if (answer := self._in_known_session(key_id, body, attrs)) is not None:
                return answer
            reply = self.invoke(body, attrs, wire.CONTENT_TYPE, NEW_SESSION)
            try:
                session = parse_session(reply.new_session or "")
            except ValueError:  # the endpoint opens no sessions (FHE_BENTO_SESSION_SECONDS=0): stop asking
                self.key_affinity = False
            else:
                with self._lock:
                    self.sessions[key_id] = session
            return reply.body

    def _in_known_session(self, key_id: str, body: bytes, attrs: str) -> bytes | None:
        """The answer sent in the key's open session; None if it has none, or its session was refused
        (then forgotten)."""
        session = self._session(key_id)
        if session is None:
            return None
        try:
            return self.invoke(body, attrs, wire.CONTENT_TYPE, session.id).body
        except FHEServiceError as exc:
            if exc.code != "invalid_session":
                raise
        with self._lock:
            if self.sessions.get(key_id) == session:
                del self.sessions[key_id]
        return None

    def _session(self, key_id: str) -> Session | None:
        """The key's session, unless it ends within a minute (a request sent now could outlive it)."""
        with self._lock:
            session = self.sessions.get(key_id)
        return session if session is not None and not session.expired(margin_seconds=60) else None


def split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


class ModelFolders:
    """Model facts from the deployed artifacts: a local folder of model folders, or `s3://.../model.tar.gz`."""

    def __init__(self, source: str | Path, s3: Any = None) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        if str(source).startswith("s3://"):
            bucket, key = split_s3(str(source))
            archive = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if member.isfile() and len(parts) >= 2 and parts[-1] in ("client.zip", "fhe-bento.json"):
                        data = tar.extractfile(member)
                        assert data is not None  # a regular file
                        self.files.setdefault(parts[-2], {})[parts[-1]] = data.read()
        else:
            for folder in Path(source).iterdir():
                if (folder / "fhe-bento.json").is_file():
                    self.files[folder.name] = {
                        n: (folder / n).read_bytes() for n in ("client.zip", "fhe-bento.json")
                    }

    def info(self, name: str) -> dict[str, Any]:
        if name not in self.files:
            raise FHEServiceError(404, "unknown_model", f"no model named {name!r} in the deployed artifacts")
        meta = json.loads(self.files[name]["fhe-bento.json"])
        # A training circuit's facts, as the server's listing gives them (`fit` reads them there).
        if training := meta.pop("training", None):
            meta |= {
                "training": True,
                "batch_size": training["batch_size"],
                "parameters_range": training["parameters_range"],
            }
        return {"name": name, **meta}


class FromArtifacts:
    """Model facts of a transport read from the deployed artifacts, not asked of an endpoint."""

    models: ModelFolders

    def get_model(self, name: str) -> dict[str, Any]:
        return self.models.info(name)

    def get_client_zip(self, name: str) -> tuple[bytes, str]:
        return self.models.files[name]["client.zip"], ""

    # Training sessions need an endpoint that answers: real time, or asynchronous (not Batch Transform).
    whole_epochs = False

    def start_training(self, name: str, key_id: str | None, weights: list[bytes]) -> dict[str, Any]:
        raise _training_not_served()

    def training_epoch(
        self, name: str, training_id: str, step: int, batches: list[list[bytes]]
    ) -> dict[str, Any]:
        raise _training_not_served()

    def training_step(self, name: str, training_id: str, step: int, batch: list[bytes]) -> dict[str, Any]:
        raise _training_not_served()

    def training_status(self, name: str, training_id: str) -> dict[str, Any]:
        raise _training_not_served()

    def training_weights(self, name: str, training_id: str) -> tuple[list[bytes], int]:
        raise _training_not_served()

    def delete_training(self, name: str, training_id: str) -> None:
        raise _training_not_served()


def _training_not_served() -> FHEServiceError:
    return FHEServiceError(
        0,
        "not_supported",
        "training sessions run on a real-time or an asynchronous endpoint: FHEClient.sagemaker(name, mode=...)",
    )


class AsyncJob:
    """One asynchronous invocation: where its answer (or failure) will appear in S3, and how many rows it
    answers (0: an op that answers JSON)."""

    def __init__(self, s3: Any, output_location: str, failure_location: str | None, rows: int) -> None:
        self.s3 = s3
        self.output_location = output_location
        self.failure_location = failure_location
        self.rows = rows

    def _fetch(self, url: str | None) -> bytes | None:
        if not url:
            return None
        bucket, key = split_s3(url)
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def result(self, timeout: float = 3600.0, poll: float = 2.0, progress: bool = True) -> list[bytes]:
        """The job's answers to its rows."""
        return batch_answer(self.answer(timeout, poll, progress), self.rows)

    def answer(self, timeout: float = 3600.0, poll: float = 2.0, progress: bool = True) -> bytes:
        """The job's answer, polled for every `poll` seconds until it (or its failure) appears: waiting
        for one answer, not retrying a failed one."""
        deadline = time.monotonic() + timeout
        with tqdm(desc="async inference", unit="poll", disable=not progress) as bar:
            while time.monotonic() < deadline:
                answer = self._fetch(self.output_location)
                if answer is not None:
                    return answer
                failure = self._fetch(self.failure_location)
                if failure is not None:
                    raise _model_error(424, failure)
                bar.update()
                time.sleep(poll)
        raise TimeoutError(f"no answer at {self.output_location} after {timeout:.0f} s")


class AsyncSageMakerTransport(TrainingOps, FromArtifacts):
    """Asynchronous endpoint transport: envelopes in, framed answers out, through S3. Training sends an
    epoch a request (`training_epoch`): one asynchronous invocation may take minutes."""

    whole_epochs = True

    def __init__(
        self,
        endpoint_name: str,
        input_prefix: str,
        models: ModelFolders,
        runtime_client: Any = None,
        s3_client: Any = None,
        progress: bool = True,
    ) -> None:
        import boto3

        self.endpoint_name = endpoint_name
        self.input_prefix = input_prefix.rstrip("/")
        self.models = models
        self.runtime = runtime_client or boto3.client("sagemaker-runtime")
        self.s3 = s3_client or boto3.client("s3")
        self.progress = progress
        self._pending_keys: dict[str, bytes] = {}  # key id -> key, sent inline until a job registers it
        self._registered: set[str] = set()

    def has_key(self, name: str, key_id: str) -> bool:
        return key_id in self._registered

    def put_key(self, name: str, key: bytes, on_progress: Callable[[int], None]) -> dict[str, Any]:
        key_id = keys.key_id(key)
        self._pending_keys[key_id] = key
        on_progress(len(key))
        return {"key_id": key_id, "bytes": len(key)}

    def _invoke(self, body: bytes, attrs: str, content_type: str, rows: int) -> AsyncJob:
        """One asynchronous invocation: the body put in S3 under the input prefix, the endpoint told."""
        bucket, prefix = split_s3(self.input_prefix)
        key = f"{prefix}/{uuid.uuid4().hex}.fhe".lstrip("/")
        self.s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        response = self.runtime.invoke_endpoint_async(
            EndpointName=self.endpoint_name,
            InputLocation=f"s3://{bucket}/{key}",
            ContentType=content_type,
            CustomAttributes=attrs,
        )
        return AsyncJob(self.s3, response["OutputLocation"], response.get("FailureLocation"), rows)

    def submit(self, name: str, key_id: str | None, rows: list[bytes]) -> AsyncJob:
        inline = self._pending_keys.get(key_id, b"") if key_id else b""
        envelope = wire.encode_envelope(rows, name, key_id, inline)
        return self._invoke(
            envelope, attributes(op="envelope", model=name), wire.ENVELOPE_CONTENT_TYPE, len(rows)
        )

    def exchange(self, body: bytes, attrs: str, content_type: str) -> bytes:
        return self._invoke(body, attrs, content_type, 0).answer(progress=self.progress)

    def start_training(self, name: str, key_id: str | None, weights: list[bytes]) -> dict[str, Any]:
        """A session needs its key registered first: a key held back for an envelope is sent on its own."""
        if key_id in self._pending_keys:
            self.exchange(self._pending_keys[key_id], attributes(op="put_key", model=name), OCTET_STREAM)
            self._registered.add(key_id)
            self._pending_keys.pop(key_id)
        return super().start_training(name, key_id, weights)

    def predict_batch(self, name: str, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        answers = self.submit(name, key_id, rows).result(progress=self.progress)
        if key_id:
            self._registered.add(key_id)
            self._pending_keys.pop(key_id, None)
        return answers
