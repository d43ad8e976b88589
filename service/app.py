"""The fhe-bento HTTP service: `bentoml serve service.app:FHEBento`.

Routes live on a FastAPI app mounted into the BentoML service (BentoML's own `@bentoml.api` routes are
POST-only and cannot carry path parameters). This process only validates and routes: it never imports
concrete, and all FHE work happens in the `FHERunner` worker processes it depends on.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from runners.errors import FHEBentoError, RunnerReply, bad_request, not_found
from runners.fhe_runner import FHERunner
from runners.key_store import check_key_id, open_store
from runners.model_repo import ModelSpec, default_model, load_specs
from runners.settings import get_settings
from service import wire
from service.bodies import OCTET_STREAM, read_limited, require_content_type, spool_limited
from service.compat import router as compat_router
from service.responses import client_zip_response

log = logging.getLogger("bentoml.fhe_bento.service")
settings = get_settings()
KEY_ID_HEADER = "x-fhe-key-id"
READY_TIMEOUT = 0.5  # seconds; SageMaker gives /ping 2 s

app = FastAPI(title="fhe-bento", version="1", docs_url=None, redoc_url=None)


@app.exception_handler(FHEBentoError)
async def _fhe_error(request: Request, exc: FHEBentoError) -> Response:
    if request.method == "HEAD":
        return Response(status_code=exc.status)
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return await _fhe_error(request, bad_request("invalid_request", f"{where}: {first.get('msg', 'invalid')}"))


@bentoml.service(name="fhe_bento", traffic={"timeout": settings.request_timeout})
@bentoml.asgi_app(app, path="/")
class FHEBento:
    runner = bentoml.depends(FHERunner)

    def __init__(self) -> None:
        self.specs = load_specs(settings)
        self.default = default_model(settings, self.specs)
        self.store = open_store(settings.key_store_url())
        self.staging = settings.staging_path()
        self.runner_ready = False
        log.info("serving models %s (default %s)", sorted(self.specs), self.default.name)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise not_found("unknown_model", f"no model named {name!r} is served") from None

    async def is_ready(self) -> bool:
        # Asked once per process until true: later pings never wait on a runner busy with FHE.
        if not self.runner_ready:
            try:
                self.runner_ready = bool(await asyncio.wait_for(self.runner.to_async.ready(), READY_TIMEOUT))
            except Exception:  # runner still starting: connection refused, timeout, ...
                return False
        return self.runner_ready

    async def call(self, method: str, **kwargs) -> RunnerReply:
        try:
            reply = await getattr(self.runner.to_async, method)(**kwargs)
        except Exception as exc:
            log.warning("runner call %s failed: %s", method, type(exc).__name__)
            raise FHEBentoError(503, "runner_unavailable", "the FHE runner did not answer; retry") from None
        return reply.unwrap()

    async def register_key(self, spec: ModelSpec, path: Path, key_id: str) -> tuple[dict, int]:
        """Have the runner verify and store a spooled key upload. Returns (answer, HTTP status)."""
        try:
            info = (await self.call("register_key", model=spec.name, key_id=key_id, staged_path=str(path))).info
        finally:
            path.unlink(missing_ok=True)
        return {"key_id": info["key_id"], "bytes": info["bytes"]}, 201 if info["created"] else 200

    async def predict(self, spec: ModelSpec, key_id: str | None, ciphertext: bytes) -> bytes:
        return (await self.call("predict", model=spec.name, key_id=key_id, ciphertext=ciphertext)).payload


def svc() -> FHEBento:
    return bentoml.get_current_service()


def _key_id_header(request: Request) -> str | None:
    key_id = request.headers.get(KEY_ID_HEADER)
    return check_key_id(key_id.strip().lower()) if key_id else None


@app.get("/ping")
async def ping() -> Response:
    if await svc().is_ready():
        return Response(status_code=200)
    return JSONResponse(FHEBentoError(503, "not_ready", "models are still loading").body(), status_code=503)


@app.get("/v1/models")
async def list_models() -> list[dict]:
    return [spec.public() for spec in svc().specs.values()]


@app.get("/v1/models/{name}")
async def get_model(name: str) -> dict:
    return svc().spec(name).public()


@app.get("/v1/models/{name}/client.zip")
async def get_client_zip(name: str) -> FileResponse:
    return client_zip_response(svc().spec(name))


@app.post("/v1/models/{name}/keys")
async def upload_key(name: str, request: Request) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, OCTET_STREAM)
    path, key_id, _ = await spool_limited(request, settings.max_key_bytes, service.staging)
    answer, status = await service.register_key(spec, path, key_id)
    return JSONResponse(answer, status_code=status)


@app.head("/v1/models/{name}/keys/{key_id}")
async def has_key(name: str, key_id: str) -> Response:
    service = svc()
    spec = service.spec(name)
    if not service.store.has(spec.key_scope, check_key_id(key_id)):
        raise not_found("unknown_key", f"key {key_id} is not registered for model {name!r}")
    return Response(status_code=200)


@app.delete("/v1/models/{name}/keys/{key_id}")
async def delete_key(name: str, key_id: str) -> Response:
    service = svc()
    spec = service.spec(name)
    if not service.store.delete(spec.key_scope, check_key_id(key_id)):
        raise not_found("unknown_key", f"key {key_id} is not registered for model {name!r}")
    log.info("key deleted: model=%s key_id=%s", name, key_id)
    return Response(status_code=204)


@app.post("/v1/models/{name}/predict")
async def predict(name: str, request: Request) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, OCTET_STREAM)
    ciphertext = await read_limited(request, settings.max_ciphertext_bytes)
    result = await service.predict(spec, _key_id_header(request), ciphertext)
    return Response(result, media_type=OCTET_STREAM)


@app.post("/v1/models/{name}/predict_batch")
async def predict_batch(name: str, request: Request) -> Response:
    service = svc()
    spec = service.spec(name)
    require_content_type(request, wire.CONTENT_TYPE, OCTET_STREAM)
    body = await read_limited(request, settings.max_batch_bytes)
    try:
        rows = wire.decode_batch(body, settings.max_batch_rows)
    except wire.FramingError as exc:
        raise bad_request("invalid_batch", str(exc)) from None
    reply = await service.call("predict_batch", model=spec.name, key_id=_key_id_header(request), ciphertexts=rows)
    return Response(wire.encode_batch(reply.payload), media_type=wire.CONTENT_TYPE)


app.include_router(compat_router)
