"""The native prediction routes, `POST /v1/models/{name}/predict` and `.../predict_batch`, as plain ASGI in
front of FastAPI's routing.

Every row of a cheap circuit (a linear model, a hybrid model's layer: a few milliseconds of FHE) takes one
of these two routes, and FastAPI's route matching over every route and its dependency solving cost about
0.2 ms of CPU a request (measured in process: 117 us here against 307-367 us through a FastAPI route for
the same operation). Here they cost a regular expression. Nothing else changes: the same token check
(`service/auth.py`), body declarations (`service/bodies.py`), operations and error shape as every other
route, inside `RequestLimits` (header size, deadline, client gone). Every other path goes on to FastAPI.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from fhe_bento.service import bodies
from fhe_bento.service.auth import Caller, predict_caller
from fhe_bento.service.operations import Operations, decode_rows, operations_of
from fhe_bento.service.responses import error_response

# A model name may hold slashes (a hybrid model's circuit, `MODEL/MODULE/SHAPE`), as FastAPI's `{name:path}`.
PREDICT_PATH = re.compile(r"/v1/models/(?P<name>.+)/(?P<op>predict|predict_batch)")


def key_id_header(request: Request) -> str | None:
    key_id = request.headers.get(KEY_ID_HEADER)
    return key_id.strip().lower() if key_id else None


async def _predict(request: Request, caller: Caller, ops: Operations, spec: ModelSpec) -> Response:
    ciphertext = await bodies.CIPHERTEXT.read_bytes(request)
    result = await ops.predict(spec, caller, key_id_header(request), ciphertext)
    return Response(result, media_type=OCTET_STREAM)


async def _predict_batch(request: Request, caller: Caller, ops: Operations, spec: ModelSpec) -> Response:
    rows = decode_rows(await bodies.BATCH.read_bytes(request), ops.settings.max_batch_rows)
    results = await ops.predict_batch(spec, caller, key_id_header(request), rows)
    return Response(wire.encode_batch(results), media_type=wire.CONTENT_TYPE)


async def _route(request: Request, name: str, op: str) -> Response:
    """The caller's token, then the model, before any body is read (as the FastAPI routes' dependencies)."""
    caller = await predict_caller(request)
    ops = await operations_of(request.app)
    return await ROUTES[op](request, caller, ops, ops.spec(name))


ROUTES = {"predict": _predict, "predict_batch": _predict_batch}


class HotPath:
    """ASGI middleware: the prediction routes (module docstring); any other request goes on to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            PREDICT_PATH.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if match is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await _route(request, match["name"], match["op"])
        except FHEBentoError as exc:
            response = error_response(exc, request.method)
        await response(scope, receive, send)
