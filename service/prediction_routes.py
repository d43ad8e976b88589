"""The native prediction routes, `POST /v1/models/{name}/predict` and `.../predict_batch`: plain Starlette
routes at the head of the app's route list (`service/app.py`).

They are real routes, matched by the framework like every other one: BentoML forwards a request to the
mounted app only when one of the app's routes matches it. Every row of a cheap circuit (a linear model, a
hybrid model's layer: a few milliseconds of FHE) takes one of them, so they are Starlette routes rather
than FastAPI ones: FastAPI's dependency solving and parameter validation cost about 0.2 ms of CPU a
request (docs/benchmarks.md, "The prediction routes"). Nothing else differs from the FastAPI routes: the
same preamble in the same order as their dependencies (the caller's token, the operations, the model,
before any body is read), the same body declarations (`service/bodies.py`), and errors rendered by the
app's one handler.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from fhe_bento.service import bodies
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.operations import Operations, decode_rows, operations_of


async def _preamble(request: Request) -> tuple[Caller, Operations, ModelSpec]:
    caller = await predict_caller(request)
    ops = await operations_of(request.app)
    return caller, ops, ops.spec(request.path_params["name"])


async def predict(request: Request) -> Response:
    caller, ops, spec = await _preamble(request)
    ciphertext = await bodies.CIPHERTEXT.read_bytes(request)
    result = await ops.predict(spec, caller, request.headers.get(KEY_ID_HEADER), ciphertext)
    return Response(result, media_type=OCTET_STREAM)


async def predict_batch(request: Request) -> Response:
    caller, ops, spec = await _preamble(request)
    rows = decode_rows(await bodies.BATCH.read_bytes(request), ops.settings.max_batch_rows)
    results = await ops.predict_batch(spec, caller, request.headers.get(KEY_ID_HEADER), rows)
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)


def prediction_routes() -> list[BaseRoute]:
    """The two routes. A model name may hold slashes (a hybrid model's circuit, `MODEL/MODULE/SHAPE`)."""
    return [
        Route("/v1/models/{name:path}/predict", predict, methods=["POST"]),
        Route("/v1/models/{name:path}/predict_batch", predict_batch, methods=["POST"]),
    ]
