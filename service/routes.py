"""Native v1 routes. Each one checks the caller's token, validates its request, then calls an operation of
the service. Token checks are FastAPI dependencies, so they run before any body is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from runners.errors import bad_request, not_found
from runners.key_store import check_key_id
from runners.settings import get_settings
from service import wire
from service.wire import OCTET_STREAM
from service.auth import Caller, admin_caller, predict_caller
from service.bodies import read_limited, require_content_type, spool_limited
from service.responses import client_zip_response

if TYPE_CHECKING:
    from service.app import FHEBento

router = APIRouter(prefix="/v1/models")
admin_router = APIRouter(prefix="/v1/keys")
PREDICT = Depends(predict_caller)
ADMIN = Depends(admin_caller)
settings = get_settings()
KEY_ID_HEADER = "x-fhe-key-id"


def svc() -> FHEBento:
    return bentoml.get_current_service()


def key_id_header(request: Request) -> str | None:
    key_id = request.headers.get(KEY_ID_HEADER)
    return check_key_id(key_id.strip().lower()) if key_id else None


def decode_rows(body: bytes) -> list[bytes]:
    try:
        return wire.decode_batch(body, settings.max_batch_rows)
    except wire.FramingError as exc:
        raise bad_request("invalid_batch", str(exc)) from None


@router.get("")
async def list_models(caller: Caller = PREDICT) -> list[dict]:
    return svc().list_models()


@router.get("/{name}")
async def get_model(name: str, caller: Caller = PREDICT) -> dict:
    return svc().spec(name).public()


@router.get("/{name}/client.zip")
async def get_client_zip(name: str, caller: Caller = PREDICT) -> FileResponse:
    return client_zip_response(svc().spec(name))


@router.post("/{name}/keys")
async def upload_key(name: str, request: Request, caller: Caller = PREDICT) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, OCTET_STREAM)
    path, key_id, _ = await spool_limited(request, settings.max_key_bytes, service.staging)
    answer, status = await service.register_key(spec, caller, path, key_id)
    return JSONResponse(answer, status_code=status)


@router.head("/{name}/keys/{key_id}")
async def has_key(name: str, key_id: str, caller: Caller = PREDICT) -> Response:
    service = svc()
    if not await service.has_key(service.spec(name), caller, key_id):
        raise not_found("unknown_key", f"key {key_id} is not registered for model {name!r}")
    return Response(status_code=200)


@router.delete("/{name}/keys/{key_id}")
async def delete_key(name: str, key_id: str, caller: Caller = PREDICT) -> Response:
    service = svc()
    await service.delete_key(service.spec(name), caller, key_id)
    return Response(status_code=204)


@router.put("/{name}/keys/{key_id}/parts/{index}")
async def put_key_part(name: str, key_id: str, index: int, request: Request, caller: Caller = PREDICT) -> dict:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, OCTET_STREAM)
    body = await read_limited(request, settings.max_part_bytes)
    return await service.put_key_part(spec, caller, key_id, index, body)


@router.get("/{name}/keys/{key_id}/parts")
async def key_parts(name: str, key_id: str, caller: Caller = PREDICT) -> dict:
    service = svc()
    return await service.key_parts(service.spec(name), caller, key_id)


@router.post("/{name}/keys/{key_id}/complete")
async def complete_key(name: str, key_id: str, parts: int, caller: Caller = PREDICT) -> Response:
    service = svc()
    answer, status = await service.complete_key(service.spec(name), caller, key_id, parts)
    return JSONResponse(answer, status_code=status)


@router.post("/{name}/predict")
async def predict(name: str, request: Request, caller: Caller = PREDICT) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, OCTET_STREAM)
    ciphertext = await read_limited(request, settings.max_ciphertext_bytes)
    return Response(await service.predict(spec, caller, key_id_header(request), ciphertext), media_type=OCTET_STREAM)


@router.post("/{name}/predict_batch")
async def predict_batch(name: str, request: Request, caller: Caller = PREDICT) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, wire.CONTENT_TYPE, OCTET_STREAM)
    rows = decode_rows(await read_limited(request, settings.max_batch_bytes))
    results = await service.predict_batch(spec, caller, key_id_header(request), rows)
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)


@admin_router.get("")
async def list_keys(caller: Caller = ADMIN) -> list[dict]:
    return await svc().list_keys()


@admin_router.delete("/{scope}/{key_id}")
async def delete_any_key(scope: str, key_id: str, caller: Caller = ADMIN) -> Response:
    await svc().delete_any_key(scope, key_id)
    return Response(status_code=204)
