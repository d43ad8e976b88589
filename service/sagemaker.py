"""SageMaker's hosting contract: `GET /ping` and `POST /invocations` carrying every operation.

SageMaker forwards nothing but `/invocations`, so the operation, model and key id travel in
`X-Amzn-SageMaker-Custom-Attributes`, e.g. `op=predict; model=breast-cancer-xgb; key=<key_id>`.
Operations (README, "SageMaker operations"): list_models, get_client, predict, predict_batch, has_key, put_key,
put_key_part, key_parts, complete_key and envelope (asynchronous inference; also chosen when the body
starts with the envelope magic and no op is given).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, BinaryIO, Literal

import bentoml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from runners.errors import FHEBentoError, bad_request, too_large
from runners.settings import get_settings
from service import wire
from service.wire import OCTET_STREAM
from service.auth import Caller, predict_caller
from service.bodies import read_limited, require_content_type, spool_chunks, spool_limited
from service.responses import client_zip_response
from service.routes import decode_rows

if TYPE_CHECKING:
    from service.app import FHEBento

router = APIRouter()
settings = get_settings()
ATTRIBUTES_HEADER = "x-amzn-sagemaker-custom-attributes"
MAX_ATTRIBUTES = 1024  # SageMaker's own cap on the header
CHUNK = 1 << 20

Op = Literal[
    "list_models", "get_client", "predict", "predict_batch", "has_key", "put_key", "put_key_part", "key_parts",
    "complete_key", "envelope",
]


class Attributes(BaseModel):
    model_config = ConfigDict(extra="ignore")

    op: Op | None = None
    model: str | None = None
    key: str | None = None
    part: int | None = None
    parts: int | None = None


def parse_attributes(text: str) -> Attributes:
    if len(text) > MAX_ATTRIBUTES:
        raise bad_request("invalid_attributes", f"custom attributes are at most {MAX_ATTRIBUTES} characters")
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise bad_request("invalid_attributes", f"custom attribute {item[:40]!r} is not name=value")
        fields[name.strip()] = value.strip()
    try:
        return Attributes.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise bad_request("invalid_attributes", f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


def require(value, name: str):
    if value is None:
        raise bad_request("invalid_attributes", f"this op needs the custom attribute {name}=")
    return value


@router.get("/ping")
async def ping() -> Response:
    service: FHEBento = bentoml.get_current_service()
    if await service.is_ready():
        return Response(status_code=200)
    return JSONResponse(FHEBentoError(503, "not_ready", "models are still loading").body(), status_code=503)


@router.post("/invocations")
async def invocations(request: Request, caller: Caller = Depends(predict_caller)) -> Response:
    service: FHEBento = bentoml.get_current_service()
    attrs = parse_attributes(request.headers.get(ATTRIBUTES_HEADER, ""))
    op = attrs.op
    if op is None:
        # Async inference may come without attributes: an envelope says what it is by its first bytes.
        require_content_type(request, wire.ENVELOPE_CONTENT_TYPE, OCTET_STREAM)
        op = "envelope"
    if op == "envelope":
        return await _envelope(service, request, attrs, caller)

    spec = service.spec(attrs.model)
    if op == "list_models":
        return JSONResponse(service.list_models())
    if op == "get_client":
        return client_zip_response(spec)
    if op == "has_key":
        key_id = require(attrs.key, "key")
        return JSONResponse({"key_id": key_id, "registered": await service.has_key(spec, caller, key_id)})
    if op == "key_parts":
        return JSONResponse(await service.key_parts(spec, caller, require(attrs.key, "key")))
    if op == "complete_key":
        answer, status = await service.complete_key(spec, caller, require(attrs.key, "key"), require(attrs.parts, "parts"))
        return JSONResponse(answer, status_code=status)

    require_content_type(request, OCTET_STREAM, wire.CONTENT_TYPE)
    if op == "put_key":
        path, key_id, _ = await spool_limited(request, settings.max_key_bytes, service.staging)
        answer, status = await service.register_key(spec, caller, path, key_id)
        return JSONResponse(answer, status_code=status)
    if op == "put_key_part":
        body = await read_limited(request, settings.max_part_bytes)
        part = await service.put_key_part(spec, caller, require(attrs.key, "key"), require(attrs.part, "part"), body)
        return JSONResponse(part)
    if op == "predict":
        ciphertext = await read_limited(request, settings.max_ciphertext_bytes)
        return Response(await service.predict(spec, caller, attrs.key, ciphertext), media_type=OCTET_STREAM)
    rows = decode_rows(await read_limited(request, settings.max_batch_bytes))  # predict_batch
    return Response(wire.encode_batch(await service.predict_batch(spec, caller, attrs.key, rows)), media_type=wire.CONTENT_TYPE)


async def _region(fh: BinaryIO, size: int) -> AsyncIterator[bytes]:
    while size:
        chunk = fh.read(min(CHUNK, size))
        if not chunk:
            raise bad_request("invalid_envelope", "the envelope ends inside its evaluation key")
        size -= len(chunk)
        yield chunk


async def _envelope(service: FHEBento, request: Request, attrs: Attributes, caller: Caller) -> Response:
    """Run an async-inference envelope: optional inline key (registered like an upload), then a batch."""
    limit = settings.max_key_bytes + settings.max_batch_bytes + wire.MAX_ENVELOPE_HEADER + 16
    path, _, _ = await spool_limited(request, limit, service.staging)
    try:
        with path.open("rb") as fh:
            try:
                header, offset = wire.read_envelope_header(fh.read(len(wire.ENVELOPE_MAGIC) + 4 + wire.MAX_ENVELOPE_HEADER))
            except wire.FramingError as exc:
                raise bad_request("invalid_envelope", str(exc)) from None
            spec = service.spec(header.model or attrs.model)
            fh.seek(offset)
            key_id = header.key_id or attrs.key
            if header.key_bytes:
                if header.key_bytes > settings.max_key_bytes:
                    raise too_large("the inline key is over FHE_BENTO_MAX_KEY_BYTES")
                key_path, key_id, _ = await spool_chunks(_region(fh, header.key_bytes), header.key_bytes, service.staging)
                await service.register_key(spec, caller, key_path, key_id)
            rows_body = fh.read(settings.max_batch_bytes + 1)
    finally:
        path.unlink(missing_ok=True)
    if len(rows_body) > settings.max_batch_bytes:
        raise too_large("the envelope's batch is over FHE_BENTO_MAX_BATCH_BYTES")
    results = await service.predict_batch(spec, caller, key_id, decode_rows(rows_body))
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)
