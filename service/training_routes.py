"""Training-session routes (`service/trainings.py`): in the style of the key routes, with the caller's
token checked first (a FastAPI dependency), bodies in the batch framing of `protocol/wire.py` read by their
declaration (`service/bodies.py`), and sessions that belong to the caller's token.

    POST   /v1/models/{name}/trainings                     [weights, bias] -> 201 {training_id, step: 0}
    POST   /v1/models/{name}/trainings/{id}/steps?step=N   [x, y]          -> 200 {step: N + 1}
    POST   /v1/models/{name}/trainings/{id}/epochs?step=N  [x1, y1, ...]   -> 200 {step: N + batches}
    GET    /v1/models/{name}/trainings/{id}/weights        -> [weights, bias], the step in a header
    GET    /v1/models/{name}/trainings/{id}                -> the session's status
    DELETE /v1/models/{name}/trainings/{id}                -> 204
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from fhe_bento.protocol.names import KEY_ID_HEADER
from fhe_bento.service import bodies, responses
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.operations import Operations, current_operations

router = APIRouter(prefix="/v1/models")
PREDICT = Depends(predict_caller)
OPS = Depends(current_operations)


@router.post("/{name:path}/trainings")
async def start_training(
    name: str, request: Request, caller: Caller = PREDICT, ops: Operations = OPS
) -> JSONResponse:
    spec = ops.spec(name)
    body = await bodies.BATCH.read_bytes(request)
    return responses.training_started(
        await ops.start_training(spec, caller, request.headers.get(KEY_ID_HEADER), body)
    )


@router.post("/{name:path}/trainings/{training_id}/steps")
async def training_step(
    name: str,
    training_id: str,
    request: Request,
    step: int = Query(ge=0),
    caller: Caller = PREDICT,
    ops: Operations = OPS,
) -> dict[str, int]:
    spec = ops.spec(name)
    body = await bodies.BATCH.read_bytes(request)
    return {"step": await ops.training_step(spec, caller, training_id, step, body)}


@router.post("/{name:path}/trainings/{training_id}/epochs")
async def training_epoch(
    name: str,
    training_id: str,
    request: Request,
    step: int = Query(ge=0),
    caller: Caller = PREDICT,
    ops: Operations = OPS,
) -> dict[str, int]:
    spec = ops.spec(name)
    body = await bodies.BATCH.read_bytes(request)
    return {"step": await ops.training_epoch(spec, caller, training_id, step, body)}


@router.get("/{name:path}/trainings/{training_id}/weights")
async def training_weights(
    name: str, training_id: str, caller: Caller = PREDICT, ops: Operations = OPS
) -> Response:
    _, state = await ops.training(ops.spec(name), caller, training_id)
    return responses.training_weights(state)


@router.get("/{name:path}/trainings/{training_id}")
async def training_status(
    name: str, training_id: str, caller: Caller = PREDICT, ops: Operations = OPS
) -> dict[str, Any]:
    session, state = await ops.training(ops.spec(name), caller, training_id)
    return session.public(state)


@router.delete("/{name:path}/trainings/{training_id}")
async def delete_training(
    name: str, training_id: str, caller: Caller = PREDICT, ops: Operations = OPS
) -> Response:
    await ops.delete_training(ops.spec(name), caller, training_id)
    return Response(status_code=204)
