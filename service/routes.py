"""Native v1 routes. Each one checks the caller's token, reads its body by its operation's declaration
(`service/bodies.py`), then calls the operation. Token checks are FastAPI dependencies, so they run
before any body is read; the operations come by dependency too (`current_operations`).

A model name may hold slashes: a hybrid model's circuit is served as `MODEL/MODULE/SHAPE`
(`models/repository.py`), so `{name:path}`, and the bare `GET /v1/models/{name}` comes last. The two
prediction routes, `POST /v1/models/{name}/predict` and `.../predict_batch`, are plain Starlette routes
ahead of these (`service/prediction_routes.py`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import PartsHeld, PartStored
from fhe_bento.service import bodies
from fhe_bento.service.auth import Caller, admin_caller, predict_caller
from fhe_bento.service.operations import Operations, current_operations
from fhe_bento.service.responses import client_zip_response, key_registered

router = APIRouter(prefix="/v1/models")
admin_router = APIRouter(prefix="/v1/keys")
PREDICT = Depends(predict_caller)
ADMIN = Depends(admin_caller)
OPS = Depends(current_operations)


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


class DefaultVersion(BaseModel):
    version: str


@router.put("/{name:path}/default")
async def set_default_version(
    name: str, body: DefaultVersion, caller: Caller = ADMIN, ops: Operations = OPS
) -> dict[str, Any]:
    """Admin: the version that serves requests naming `name` alone (`service/versions.py`)."""
    state = await asyncio.to_thread(ops.versions.set_default, name, body.version)
    return state.model_dump()


@router.post("/{name:path}/versions/{version}/retire")
async def retire_version(
    name: str, version: str, caller: Caller = ADMIN, ops: Operations = OPS
) -> dict[str, Any]:
    """Admin: requests naming this version get 410 version_retired from now on."""
    state = await asyncio.to_thread(ops.versions.retire, name, version)
    return state.model_dump()


@router.get("/{name:path}")
async def get_model(name: str, caller: Caller = PREDICT, ops: Operations = OPS) -> dict:
    return ops.describe(name)


@admin_router.get("")
async def list_keys(caller: Caller = ADMIN, ops: Operations = OPS) -> list[dict[str, Any]]:
    return await ops.list_keys()


@admin_router.delete("/{scope}/{key_id}")
async def delete_any_key(scope: str, key_id: str, caller: Caller = ADMIN, ops: Operations = OPS) -> Response:
    await ops.delete_any_key(scope, key_id, caller)
    return Response(status_code=204)
