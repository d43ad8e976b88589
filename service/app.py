"""The fhe-bento HTTP service: `bentoml serve service.app:FHEBento`.

Routes live on a FastAPI app mounted into the BentoML service (BentoML's own `@bentoml.api` routes are
POST-only and cannot carry path parameters): native v1 routes (`service/routes.py`), Zama-compatible
routes (`service/compat.py`) and SageMaker's `/ping` + `/invocations` (`service/sagemaker.py`). All of
them call the operations of `FHEBento` below, so each behaviour exists once.

This process only validates and routes: it never imports concrete, and all FHE work happens in the
`FHERunner` worker processes it depends on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import bentoml
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from runners.errors import FHEBentoError, RunnerReply, bad_request, not_found, too_large
from runners.lifecycle import exit_nonzero_if_stopped, stop_server
from runners.fhe_runner import FHERunner
from runners import metrics
from runners.key_registry import KeyRegistry
from runners.key_store import KEY_ID, check_key_id, open_store
from runners.model_repo import ModelSpec, default_model, load_specs
from runners.settings import get_settings
from service.admission import Admission
from service.auth import Caller
from service.compat import router as compat_router
from service.limits import RequestLimits, request_deadline
from service.routes import admin_router, router as native_router
from service.sagemaker import router as sagemaker_router

log = logging.getLogger("bentoml.fhe_bento.service")
settings = get_settings()
READY_TIMEOUT = 0.5  # seconds; SageMaker gives /ping 2 s
RUNNER_RETRY_AFTER = 5  # seconds a client is told to wait when the runner does not answer
RUNNER_WATCH_SECONDS = 5.0

exit_nonzero_if_stopped()

app = FastAPI(title="fhe-bento", version="1", docs_url=None, redoc_url=None)
app.add_middleware(RequestLimits, max_header_bytes=settings.max_header_bytes, timeout=settings.request_timeout)


@app.exception_handler(FHEBentoError)
async def _fhe_error(request: Request, exc: FHEBentoError) -> Response:
    if request.method == "HEAD":
        return Response(status_code=exc.status, headers=exc.headers)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    # Starlette's own answers in the service's error shape. (A path that no route serves never gets here:
    # BentoML's router answers it with its plain-text 404.)
    if exc.status_code == 405:
        return await _fhe_error(request, FHEBentoError(405, "method_not_allowed", f"{request.method} is not allowed here"))
    return await _fhe_error(request, bad_request("invalid_request", str(exc.detail)))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return await _fhe_error(request, bad_request("invalid_request", f"{where}: {first.get('msg', 'invalid')}"))


# BentoML's own deadline comes a little later than RequestLimits', so that the JSON 504 gets out first.
@bentoml.service(name="fhe_bento", traffic={"timeout": settings.request_timeout + 5})
@bentoml.asgi_app(app, path="/")
class FHEBento:
    runner = bentoml.depends(FHERunner)

    def __init__(self) -> None:
        self.specs = load_specs(settings)
        self.default = default_model(settings, self.specs)
        self.keys = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.staging = settings.staging_path()
        if removed := settings.clear_staging():
            log.info("removed %d spool files left in %s by an earlier process", removed, self.staging)
        self._watch: asyncio.Future | None = None
        self._runner_seen = False  # by any health check or watch: only a runner that answered can be down
        self.admission = Admission(settings.max_queue_rows, settings.request_timeout, parallelism=os.cpu_count() or 1,
                                   batch_parallelism=settings.row_threads)
        log.info("serving models %s (default %s)", sorted(self.specs), self.default.name)

    def spec(self, name: str | None) -> ModelSpec:
        if name is None:
            return self.default
        try:
            return self.specs[name]
        except KeyError:
            raise not_found("unknown_model", f"no model named {name!r} is served") from None

    async def runner_state(self) -> bool | None:
        """True when the runner's engine is up, False while it (re)starts, None when the runner itself does
        not answer. The runner answers at once (its API is async), even while every core computes."""
        # A call to a hung runner is abandoned, not awaited: BentoML's client does not give up on
        # cancellation, so `wait_for` would hang with it.
        call = asyncio.ensure_future(self.runner.to_async.ready())
        done, _ = await asyncio.wait({call}, timeout=READY_TIMEOUT)
        if not done:
            call.cancel()
            return None
        try:
            state = bool(call.result())
        except Exception:  # runner starting or gone: connection refused, ...
            return None
        self._runner_seen = True
        return state

    async def is_ready(self) -> bool:
        """Asked on every /ping, so a dead or restarting engine turns /ping to 503 at its next check."""
        if self._watch is None:  # started here, on the serving event loop, by the first health check
            self._watch = asyncio.ensure_future(self._watch_runner())
        return bool(await self.runner_state())

    async def _watch_runner(self) -> None:
        """Stop the server once a runner that answered before has not answered for FHE_BENTO_RUNNER_DOWN_SECONDS.
        BentoML does not respawn a dead worker under BENTOML_CONTAINERIZED (so in every image), and an
        orchestrator replaces a server that exits, not one that only fails its health checks."""
        down_since = None
        while True:
            await asyncio.sleep(RUNNER_WATCH_SECONDS)
            if await self.runner_state() is not None:
                down_since = None
            elif self._runner_seen:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > settings.runner_down_seconds:
                    stop_server(f"the FHE runner has not answered for {settings.runner_down_seconds} s", kill_runners=True)
                    return

    async def call(self, method: str, **kwargs) -> RunnerReply:
        # Runner calls are safe to repeat (FHE is pure, key registration is content-addressed), and a
        # pooled connection that the runner closed as idle fails at once: so one retry, but not after a
        # timeout, which already took the whole request time.
        for attempt in (1, 2):
            try:
                reply = await getattr(self.runner.to_async, method)(**kwargs)
            except Exception as exc:
                timed_out = isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException))
                log.warning("runner call %s failed (attempt %d): %s", method, attempt, type(exc).__name__)
                if attempt == 2 or timed_out:
                    raise FHEBentoError(503, "runner_unavailable", "the FHE runner did not answer; retry",
                                        headers={"Retry-After": str(RUNNER_RETRY_AFTER)}) from None
                continue
            return reply.unwrap()
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _rows_call(self, spec: ModelSpec, caller: Caller) -> dict:
        """What every prediction call tells the runner besides its rows."""
        return {"model": spec.name, "tenant": caller.tenant, "deadline": request_deadline(settings.request_timeout)}

    # --- operations shared by every transport -------------------------------------------------------

    def list_models(self) -> list[dict]:
        return [spec.public() for spec in self.specs.values()]

    async def predict(self, spec: ModelSpec, caller: Caller, key_id: str | None, ciphertext: bytes) -> bytes:
        async with self.admission.admit(spec, 1):
            reply = await self.call("predict", key_id=key_id, ciphertext=ciphertext, **self._rows_call(spec, caller))
        self.admission.observe(spec.name, reply.info["row_seconds"])
        return reply.payload

    async def predict_batch(self, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes]) -> list[bytes]:
        async with self.admission.admit(spec, len(rows)):
            reply = await self.call("predict_batch", key_id=key_id, ciphertexts=rows, **self._rows_call(spec, caller))
        self.admission.observe(spec.name, reply.info["row_seconds"])
        return reply.payload

    async def register_key(self, spec: ModelSpec, caller: Caller, path: Path, key_id: str) -> tuple[dict, int]:
        """Have the runner verify and store a spooled key file (deleted here). Returns (answer, status)."""
        try:
            reply = await self.call("register_key", model=spec.name, tenant=caller.tenant, key_id=key_id,
                                    staged_path=str(path))
        finally:
            path.unlink(missing_ok=True)
        return {"key_id": reply.info["key_id"], "bytes": reply.info["bytes"]}, 201 if reply.info["created"] else 200

    # Key-store calls may be network round trips (s3://): they run in threads, off the event loop.

    async def has_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> bool:
        return await asyncio.to_thread(self.keys.has, caller.scope(spec), check_key_id(key_id))

    async def delete_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> None:
        scope = caller.scope(spec)
        await self._delete(scope, check_key_id(key_id), f"for model {spec.name!r}")

    async def _delete(self, scope: str, key_id: str, where: str) -> None:
        if not await asyncio.to_thread(self.keys.store.delete, scope, key_id):
            raise not_found("unknown_key", f"key {key_id} is not registered {where}")
        log.info("key deleted: scope=%s key_id=%s", scope[:12], key_id)

    async def list_keys(self) -> list[dict]:
        """Every stored key of every model and tenant (admin)."""
        store = self.keys.store
        return await asyncio.to_thread(lambda: [{"scope": scope, "key_id": key_id, **store.info(scope, key_id)}
                                                for scope, key_id in store.list_keys()])

    async def delete_any_key(self, scope: str, key_id: str) -> None:
        """Delete a key found with `list_keys` (admin)."""
        if not KEY_ID.match(scope):
            raise bad_request("invalid_scope", "a scope is the 64-character hex id that /v1/keys lists")
        await self._delete(scope, check_key_id(key_id), f"in scope {scope}")

    async def put_key_part(self, spec: ModelSpec, caller: Caller, key_id: str, index: int, data: bytes) -> dict:
        check_key_id(key_id)
        if len(data) > settings.max_part_bytes:
            raise too_large(f"a part holds at most {settings.max_part_bytes} bytes")
        if not data:
            raise bad_request("empty_body", "a key part is empty")
        await asyncio.to_thread(self.keys.put_part, caller.scope(spec), key_id, index, data,
                                model=spec.name, key_bytes=spec.meta.eval_key_bytes)
        metrics.PART_BYTES.labels(model=spec.name).inc(len(data))
        return {"key_id": key_id, "part": index, "bytes": len(data)}

    async def key_parts(self, spec: ModelSpec, caller: Caller, key_id: str) -> dict:
        scope = caller.scope(spec)
        parts = await asyncio.to_thread(self.keys.store.list_parts, scope, check_key_id(key_id))
        return {"key_id": key_id, "parts": sorted(parts), "bytes": sum(parts.values())}

    async def complete_key(self, spec: ModelSpec, caller: Caller, key_id: str, count: int) -> tuple[dict, int]:
        """Join parts 0..count-1, check the SHA-256 against the key id, then register as a whole upload."""
        check_key_id(key_id)
        most = self.keys.max_parts(spec.meta.eval_key_bytes)
        if not 0 < count <= most:
            raise bad_request("invalid_part", f"a key of model {spec.name!r} has 1 to {most} parts")
        scope = caller.scope(spec)
        known = await asyncio.to_thread(self._assemble, scope, key_id, count)
        if isinstance(known, dict):
            return known, 200
        try:
            return await self.register_key(spec, caller, known, key_id)
        finally:
            await asyncio.to_thread(self.keys.store.drop_parts, scope, key_id)

    def _assemble(self, scope: str, key_id: str, count: int) -> Path | dict:
        """The joined, digest-checked parts in a spool file; or the answer if the key is registered already
        (by an earlier or a concurrent completion)."""
        store = self.keys.store
        if self.keys.has(scope, key_id):
            store.drop_parts(scope, key_id)
            return {"key_id": key_id, "bytes": store.size(scope, key_id)}
        path = self.staging / f"assembled-{uuid.uuid4().hex}"
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("wb") as fh:
                for chunk in store.assemble_parts(scope, key_id, count):
                    size += len(chunk)
                    if size > settings.max_key_bytes:
                        raise too_large(f"the parts add up to more than {settings.max_key_bytes} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
            if digest.hexdigest() != key_id:
                raise bad_request("digest_mismatch", f"the {count} parts do not hash to key id {key_id}; resend them")
        except FHEBentoError as exc:
            path.unlink(missing_ok=True)
            if exc.code == "missing_parts" and self.keys.has(scope, key_id):
                return {"key_id": key_id, "bytes": store.size(scope, key_id)}  # a concurrent twin won
            if exc.code != "missing_parts":  # missing parts can still come; anything else starts over
                store.drop_parts(scope, key_id)
            raise
        return path


app.include_router(sagemaker_router)
app.include_router(native_router)
app.include_router(admin_router)
app.include_router(compat_router)
