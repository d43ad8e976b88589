"""A stand-in for a SageMaker real-time endpoint in front of several instances, for tests and bench/.

It answers sagemaker-runtime's `InvokeEndpoint` (`POST /endpoints/{name}/invocations`, so real boto3 talks
to it) and forwards to each instance's `/invocations` as SageMaker does, routing like SageMaker's stateful
sessions:
- a request without a session, or with `NEW_SESSION`, goes to a random instance; the session id that
  instance answers is bound to it and handed back as `X-Amzn-SageMaker-New-Session-Id`;
- a request with a bound session id goes to that instance;
- a session id it never handed out, or whose instance is gone (`remove`), is refused (ValidationError).
A container error comes back as ModelError (424) with the container's status and body, as SageMaker's does.

With `output_path` (s3://bucket/prefix) it answers `InvokeEndpointAsync` too, as SageMaker's asynchronous
inference does: 202 at once with where the answer will be, then, in the background, the input is read
from S3, sent to a random instance's `/invocations` with its custom attributes, and the answer written
to the output location (an error answer to the failure location).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fhe_bento.client.sagemaker_transport import split_s3
from fhe_bento.protocol.names import ATTRIBUTES_HEADER
from fhe_bento.protocol.sessions import NEW_SESSION, NEW_SESSION_HEADER, SESSION_HEADER, parse_session
from harness.devserver import free_port


@dataclass
class Routed:
    instance: str
    attributes: str
    session: str | None


@dataclass
class Balancer:
    instances: list[str]
    seed: int = 0
    output_path: str | None = None  # where asynchronous answers go: the endpoint's S3OutputPath
    routed: list[Routed] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._random = random.Random(self.seed)
        self._sessions: dict[str, str] = {}  # session id -> instance
        self._gone: set[str] = set()
        self._deliveries: set[asyncio.Task] = set()
        app = Starlette(
            routes=[
                Route("/endpoints/{name}/invocations", self._invoke, methods=["POST"]),
                Route("/endpoints/{name}/async-invocations", self._invoke_async, methods=["POST"]),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Balancer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the balancer did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    def add(self, instance: str) -> None:
        """A new instance joins the endpoint (an update's new fleet): it takes a share of new requests."""
        self.instances.append(instance)

    def remove(self, instance: str) -> None:
        """The instance leaves the endpoint (SageMaker replaced it): nothing is routed to it any more."""
        self._gone.add(instance)

    def counts(self, op: str) -> Counter:
        """Requests of one op per instance."""
        return Counter(r.instance for r in self.routed if f"op={op}" in r.attributes)

    def _pick(self, session: str | None) -> str | None:
        if session and session != NEW_SESSION:
            instance = self._sessions.get(session)
            return None if instance is None or instance in self._gone else instance
        return self._random.choice([i for i in self.instances if i not in self._gone])

    async def _invoke(self, request: Request) -> Response:
        session = request.headers.get(SESSION_HEADER)
        instance = self._pick(session)
        if instance is None:
            return JSONResponse(
                {"message": f"session {session!r} is not open on this endpoint"},
                status_code=400,
                headers={"x-amzn-ErrorType": "ValidationError"},
            )
        attributes = request.headers.get(ATTRIBUTES_HEADER, "")
        self.routed.append(Routed(instance, attributes, session))
        headers = {
            "Content-Type": request.headers.get("content-type", "application/octet-stream"),
            ATTRIBUTES_HEADER: attributes,
            **({SESSION_HEADER: session} if session else {}),
        }
        async with httpx.AsyncClient(timeout=600) as http:
            answer = await http.post(f"{instance}/invocations", content=await request.body(), headers=headers)
        if answer.status_code >= 400:
            return JSONResponse(
                {
                    "Message": f"Received client error ({answer.status_code}) from primary",
                    "OriginalStatusCode": answer.status_code,
                    "OriginalMessage": answer.text,
                },
                status_code=424,
                headers={"x-amzn-ErrorType": "ModelError"},
            )
        out = {
            "Content-Type": answer.headers.get("content-type", "application/octet-stream"),
            "x-Amzn-Invoked-Production-Variant": "AllTraffic",
        }
        opened = answer.headers.get(SESSION_HEADER)
        if session == NEW_SESSION and opened:
            self._sessions[parse_session(opened).id] = instance
            out[NEW_SESSION_HEADER] = opened
        return Response(answer.content, headers=out)

    async def _invoke_async(self, request: Request) -> Response:
        assert self.output_path, "asynchronous invocations need the balancer's output_path"
        inference = uuid.uuid4().hex
        output = f"{self.output_path.rstrip('/')}/{inference}.out"
        failure = f"{self.output_path.rstrip('/')}/failures/{inference}.out"
        delivery = asyncio.create_task(
            self._deliver(
                request.headers["X-Amzn-SageMaker-InputLocation"],
                request.headers.get("X-Amzn-SageMaker-Custom-Attributes", ""),
                request.headers.get("X-Amzn-SageMaker-Content-Type", "application/octet-stream"),
                output,
                failure,
            )
        )
        self._deliveries.add(delivery)  # held until done: the event loop keeps only weak references
        delivery.add_done_callback(self._deliveries.discard)
        return JSONResponse(
            {"InferenceId": inference},
            status_code=202,
            headers={"X-Amzn-SageMaker-OutputLocation": output, "X-Amzn-SageMaker-FailureLocation": failure},
        )

    async def _deliver(
        self, source: str, attributes: str, content_type: str, output: str, failure: str
    ) -> None:
        body = await asyncio.to_thread(_s3_read, source)
        instance = self._pick(None)
        assert instance is not None, "no instance left on the endpoint"
        self.routed.append(Routed(instance, attributes, None))
        async with httpx.AsyncClient(timeout=3600) as http:
            answer = await http.post(
                f"{instance}/invocations",
                content=body,
                headers={"Content-Type": content_type, ATTRIBUTES_HEADER: attributes},
            )
        await asyncio.to_thread(_s3_write, output if answer.status_code < 400 else failure, answer.content)


def _s3_read(url: str) -> bytes:
    import boto3

    bucket, key = split_s3(url)
    return bytes(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def _s3_write(url: str, data: bytes) -> None:
    import boto3

    bucket, key = split_s3(url)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
