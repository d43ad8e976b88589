"""SageMaker's hosting contract: `GET /ping` and `POST /invocations` carrying every operation.

SageMaker forwards nothing but `/invocations`, so the operation, model and key id travel in
`X-Amzn-SageMaker-Custom-Attributes`, e.g. `op=predict; model=breast-cancer-xgb; key=<key_id>`.
Operations (docs/sagemaker.md, "SageMaker operations"): list_models, get_model, get_client, predict,
predict_batch, has_key, set_default and retire (admin: model versions, `service/versions.py`), put_key,
put_key_part, key_parts, complete_key, the training-session ops (start_training, training_step,
training_epoch, training_status, training_weights, delete_training: docs/training.md), envelope (asynchronous inference;
also chosen when the body starts with the envelope magic and no op is given) and transform (Batch
Transform's JSON Lines, chosen by their content type); `GET /execution-parameters` gives Batch Transform
its defaults. A request that names a key may open or carry a stateful session (`service/sessions.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.rules import check_key_id
from fhe_bento.protocol import transform, wire
from fhe_bento.protocol.names import ATTRIBUTES_HEADER, MAX_ATTRIBUTES, OCTET_STREAM
from fhe_bento.protocol.sessions import SESSION_HEADER
from fhe_bento.service import bodies
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.bodies import media_type
from fhe_bento.service.drain import draining_error
from fhe_bento.service.operations import Operations, current_operations, decode_rows
from fhe_bento.service.responses import (
    client_zip_response,
    error_response,
    key_registered,
    training_started,
    training_weights,
)
from fhe_bento.service.sessions import session_for

router = APIRouter()


class Attributes(BaseModel):
    model_config = ConfigDict(extra="ignore")

    op: str | None = None
    model: str | None = None
    key: str | None = None
    part: int | None = None
    parts: int | None = None
    version: str | None = None
    training: str | None = None
    step: int | None = None

    @field_validator("op")
    @classmethod
    def _known(cls, op: str | None) -> str | None:
        if op is not None and op not in INVOCATIONS:
            raise ValueError(f"unknown op; one of {', '.join(INVOCATIONS)}")
        return op


def parse_attributes(text: str) -> Attributes:
    if len(text) > MAX_ATTRIBUTES:
        raise FHEBentoError(
            "invalid_attributes", f"custom attributes are at most {MAX_ATTRIBUTES} characters"
        )
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise FHEBentoError("invalid_attributes", f"custom attribute {item[:40]!r} is not name=value")
        fields[name.strip()] = value.strip()
    try:
        return Attributes.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise FHEBentoError(
            "invalid_attributes", f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
        ) from None


def require(value, name: str):
    if value is None:
        raise FHEBentoError("invalid_attributes", f"this op needs the custom attribute {name}=")
    return value


@router.get("/ping")
async def ping(ops: Operations = Depends(current_operations)) -> Response:
    if await ops.ready():
        return Response(status_code=200)
    error = draining_error() if ops.drain.draining else FHEBentoError("not_ready", "models are still loading")
    return error_response(error, "GET", counted=False)


@router.get("/execution-parameters")
async def execution_parameters(ops: Operations = Depends(current_operations)) -> JSONResponse:
    """What SageMaker Batch Transform should send, unless the job says otherwise: one request per row
    computed at once, a few hundred records each (at most 1 MB)."""
    return JSONResponse(
        {
            "MaxConcurrentTransforms": ops.settings.parallel_rows(),
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": transform.MAX_PAYLOAD_MB,
        }
    )


@dataclass(frozen=True)
class Invocation:
    """One op of `/invocations`: the body it reads (the same declaration as its native route), and what it
    does with it."""

    body: bodies.Body | None
    run: Callable[[Operations, Caller, Attributes, Any], Awaitable[Response]]  # the body `body` reads


async def _list_models(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    return JSONResponse(ops.list_models())


async def _get_model(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    return JSONResponse(ops.describe(require(attrs.model, "model")))


async def _get_client(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    return client_zip_response(ops.spec(attrs.model))


async def _has_key(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    key_id = check_key_id(require(attrs.key, "key"))  # echoed as the key is stored
    return JSONResponse(
        {"key_id": key_id, "registered": await ops.has_key(ops.spec(attrs.model), caller, key_id)}
    )


async def _key_parts(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    parts = await ops.key_parts(ops.spec(attrs.model), caller, require(attrs.key, "key"))
    return JSONResponse(parts.model_dump())


async def _complete_key(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    return key_registered(
        await ops.complete_key(
            ops.spec(attrs.model), caller, require(attrs.key, "key"), require(attrs.parts, "parts")
        )
    )


def _admin(caller: Caller) -> None:
    if not caller.admin:
        raise FHEBentoError("forbidden", "this op needs an admin token")


async def _set_default(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    _admin(caller)
    name, version = require(attrs.model, "model"), require(attrs.version, "version")
    return JSONResponse((await asyncio.to_thread(ops.versions.set_default, name, version)).model_dump())


async def _retire(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    _admin(caller)
    name, version = require(attrs.model, "model"), require(attrs.version, "version")
    return JSONResponse((await asyncio.to_thread(ops.versions.retire, name, version)).model_dump())


async def _put_key(ops: Operations, caller: Caller, attrs: Attributes, key: bytes) -> Response:
    return key_registered(await ops.register_key(ops.spec(attrs.model), caller, key))


async def _put_key_part(ops: Operations, caller: Caller, attrs: Attributes, data: bytes) -> Response:
    key_id, index = require(attrs.key, "key"), require(attrs.part, "part")
    stored = await ops.put_key_part(ops.spec(attrs.model), caller, key_id, index, data)
    return JSONResponse(stored.model_dump())


async def _predict(ops: Operations, caller: Caller, attrs: Attributes, ciphertext: bytes) -> Response:
    return Response(
        await ops.predict(ops.spec(attrs.model), caller, attrs.key, ciphertext), media_type=OCTET_STREAM
    )


async def _predict_batch(ops: Operations, caller: Caller, attrs: Attributes, body: bytes) -> Response:
    rows = decode_rows(body, ops.settings.max_batch_rows)
    results = await ops.predict_batch(ops.spec(attrs.model), caller, attrs.key, rows)
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)


async def _start_training(ops: Operations, caller: Caller, attrs: Attributes, body: bytes) -> Response:
    return training_started(await ops.start_training(ops.spec(attrs.model), caller, attrs.key, body))


async def _training_step(ops: Operations, caller: Caller, attrs: Attributes, body: bytes) -> Response:
    training_id, step = require(attrs.training, "training"), require(attrs.step, "step")
    return JSONResponse(
        {"step": await ops.training_step(ops.spec(attrs.model), caller, training_id, step, body)}
    )


async def _training_epoch(ops: Operations, caller: Caller, attrs: Attributes, body: bytes) -> Response:
    training_id, step = require(attrs.training, "training"), require(attrs.step, "step")
    return JSONResponse(
        {"step": await ops.training_epoch(ops.spec(attrs.model), caller, training_id, step, body)}
    )


async def _training_status(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    session, state = await ops.training(ops.spec(attrs.model), caller, require(attrs.training, "training"))
    return JSONResponse(session.public(state))


async def _training_weights(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    _, state = await ops.training(ops.spec(attrs.model), caller, require(attrs.training, "training"))
    return training_weights(state, step_in_body=True)


async def _delete_training(ops: Operations, caller: Caller, attrs: Attributes, body: None) -> Response:
    await ops.delete_training(ops.spec(attrs.model), caller, require(attrs.training, "training"))
    return Response(status_code=204)


async def _transform(ops: Operations, caller: Caller, attrs: Attributes, body: bytes) -> Response:
    return Response(await ops.transform(caller, body), media_type=transform.CONTENT_TYPE)


async def _envelope(ops: Operations, caller: Caller, attrs: Attributes, path: Path) -> Response:
    try:
        return Response(
            await ops.envelope(caller, path, attrs.model, attrs.key), media_type=wire.CONTENT_TYPE
        )
    finally:
        path.unlink(missing_ok=True)


INVOCATIONS: dict[str, Invocation] = {
    "list_models": Invocation(None, _list_models),
    "get_model": Invocation(None, _get_model),
    "get_client": Invocation(None, _get_client),
    "has_key": Invocation(None, _has_key),
    "set_default": Invocation(None, _set_default),
    "retire": Invocation(None, _retire),
    "key_parts": Invocation(None, _key_parts),
    "complete_key": Invocation(None, _complete_key),
    "put_key": Invocation(bodies.KEY, _put_key),
    "put_key_part": Invocation(bodies.KEY_PART, _put_key_part),
    "predict": Invocation(bodies.CIPHERTEXT, _predict),
    "predict_batch": Invocation(bodies.BATCH, _predict_batch),
    "envelope": Invocation(bodies.ENVELOPE, _envelope),
    "transform": Invocation(bodies.TRANSFORM, _transform),
    "start_training": Invocation(bodies.BATCH, _start_training),
    "training_step": Invocation(bodies.BATCH, _training_step),
    "training_epoch": Invocation(bodies.BATCH, _training_epoch),
    "training_status": Invocation(None, _training_status),
    "training_weights": Invocation(None, _training_weights),
    "delete_training": Invocation(None, _delete_training),
}


@router.post("/invocations")
async def invocations(
    request: Request, caller: Caller = Depends(predict_caller), ops: Operations = Depends(current_operations)
) -> Response:
    attrs = parse_attributes(request.headers.get(ATTRIBUTES_HEADER, ""))
    # Batch Transform and async inference send no attributes: JSON Lines say what they are by their
    # content type, an envelope by its first bytes.
    invocation = INVOCATIONS[
        attrs.op or ("transform" if media_type(request) == transform.CONTENT_TYPE else "envelope")
    ]
    session = session_for(request.headers.get(SESSION_HEADER), attrs.key, ops.settings.session_seconds)
    if invocation.body is None:
        response = await invocation.run(ops, caller, attrs, None)
    else:
        ops.spec(attrs.model)  # an unknown model is refused before its body is read
        response = await invocation.run(ops, caller, attrs, await invocation.body.read(request))
    if session is not None:  # only once the request has succeeded: a failed one opens no session
        response.headers[SESSION_HEADER] = session.header()
    return response
