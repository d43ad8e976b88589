"""Native v1 routes. Each one checks the caller's token, reads its body by its operation's declaration
(`service/bodies.py`), then calls the operation. Token checks are FastAPI dependencies, so they run
before any body is read; the operations come by dependency too (`current_operations`).

A model name may hold slashes: a hybrid model's circuit is served as `MODEL/MODULE/SHAPE`
(`core/model_repo.py`), so `{name:path}`, and the bare `GET /v1/models/{name}` comes last."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.core.runner_api import PartsHeld, PartStored
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from fhe_bento.service import bodies
from fhe_bento.service.auth import Caller, admin_caller, predict_caller
from fhe_bento.service.operations import Operations, current_operations, decode_rows
from fhe_bento.service.responses import client_zip_response, key_registered

router = APIRouter(prefix="/v1/models")
admin_router = APIRouter(prefix="/v1/keys")
PREDICT = Depends(predict_caller)
ADMIN = Depends(admin_caller)
OPS = Depends(current_operations)


def key_id_header(request: Request) -> str | None:
    key_id = request.headers.get(KEY_ID_HEADER)
    return key_id.strip().lower() if key_id else None


@router.get("")
async def list_models(caller: Caller = PREDICT, ops: Operations = OPS) -> list[dict]:
    return ops.list_models()


@router.get("/{name:path}/client.zip")
async def get_client_zip(name: str, caller: Caller = PREDICT, ops: Operations = OPS) -> FileResponse:
    return client_zip_response(ops.spec(name))


@router.post("/{name:path}/keys")
async def upload_key(
    name: str, request: Request, caller: Caller = PREDICT, ops: Operations = OPS
) -> Response:
    spec = ops.spec(name)
    return key_registered(await ops.register_key(spec, caller, await bodies.KEY.read_bytes(request)))


@router.head("/{name:path}/keys/{key_id}")
async def has_key(name: str, key_id: str, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    if not await ops.has_key(ops.spec(name), caller, key_id):
        raise FHEBentoError("unknown_key", f"key {key_id} is not registered for model {name!r}")
    return Response(status_code=200)


@router.delete("/{name:path}/keys/{key_id}")
async def delete_key(name: str, key_id: str, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    await ops.delete_key(ops.spec(name), caller, key_id)
    return Response(status_code=204)


@router.put("/{name:path}/keys/{key_id}/parts/{index}")
async def put_key_part(
    name: str, key_id: str, index: int, request: Request, caller: Caller = PREDICT, ops: Operations = OPS
) -> PartStored:
    spec = ops.spec(name)
    return await ops.put_key_part(spec, caller, key_id, index, await bodies.KEY_PART.read_bytes(request))


@router.get("/{name:path}/keys/{key_id}/parts")
async def key_parts(name: str, key_id: str, caller: Caller = PREDICT, ops: Operations = OPS) -> PartsHeld:
    return await ops.key_parts(ops.spec(name), caller, key_id)


@router.post("/{name:path}/keys/{key_id}/complete")
async def complete_key(
    name: str, key_id: str, parts: int, caller: Caller = PREDICT, ops: Operations = OPS
) -> Response:
    return key_registered(await ops.complete_key(ops.spec(name), caller, key_id, parts))


@router.post("/{name:path}/predict")
async def predict(name: str, request: Request, caller: Caller = PREDICT, ops: Operations = OPS) -> Response:
    spec = ops.spec(name)
    ciphertext = await bodies.CIPHERTEXT.read_bytes(request)
    return Response(
        await ops.predict(spec, caller, key_id_header(request), ciphertext), media_type=OCTET_STREAM
    )


@router.post("/{name:path}/predict_batch")
async def predict_batch(
    name: str, request: Request, caller: Caller = PREDICT, ops: Operations = OPS
) -> Response:
    spec = ops.spec(name)
    rows = decode_rows(await bodies.BATCH.read_bytes(request), ops.settings.max_batch_rows)
    results = await ops.predict_batch(spec, caller, key_id_header(request), rows)
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)


@router.get("/{name:path}")
async def get_model(name: str, caller: Caller = PREDICT, ops: Operations = OPS) -> dict:
    return ops.describe(name)


@admin_router.get("")
async def list_keys(caller: Caller = ADMIN, ops: Operations = OPS) -> list[dict[str, Any]]:
    return await ops.list_keys()


@admin_router.delete("/{scope}/{key_id}")
async def delete_any_key(scope: str, key_id: str, caller: Caller = ADMIN, ops: Operations = OPS) -> Response:
    await ops.delete_any_key(scope, key_id)
    return Response(status_code=204)
