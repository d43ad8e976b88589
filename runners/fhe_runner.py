"""The FHE runner: a BentoML service whose workers check every ciphertext and key, then hand them to their
supervised engine processes (`runners/engine.py`), which hold the concrete-ml servers and the key cache.

Its API methods are async: a worker only validates and relays, so `ready()` answers at once even while
every core computes FHE. Methods return a `RunnerReply` instead of raising, so that error codes cross the
process hop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import bentoml

from runners import metrics
from runners.engine import Engine
from runners.errors import FHEBentoError, RunnerReply, not_found
from runners.key_registry import KeyRegistry
from runners.lifecycle import stop_server
from runners.key_store import open_store, tenant_scope
from runners.model_repo import ModelSpec, load_specs
from runners.payload_check import check_ciphertext, check_key
from runners.settings import get_settings

log = logging.getLogger("bentoml.fhe_bento.runner")
settings = get_settings()
DISCONNECT_POLL_SECONDS = 0.5


@bentoml.service(name="fhe_runner", workers=settings.workers, traffic={"timeout": settings.request_timeout})
class FHERunner:
    def __init__(self) -> None:
        # Read by the OpenMP runtime when concrete first computes, in the engine processes this starts.
        os.environ["OMP_NUM_THREADS"] = str(settings.omp_threads_per_row())
        self.specs = load_specs(settings)
        self.keys = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.engine = Engine(settings.row_threads, settings.engine_max_failed_starts, give_up=stop_server)
        log.info("FHE runner started: models=%s engine processes=%d omp_threads=%s", sorted(self.specs),
                 settings.row_threads, os.environ["OMP_NUM_THREADS"])

    @bentoml.api
    async def ready(self) -> bool:
        return self.engine.ready()

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise not_found("unknown_model", f"no model named {name!r} is served") from None

    async def _rows(self, model: str, tenant: str, key_id: str | None, ciphertexts: list[bytes], deadline: float,
                    ctx: bentoml.Context) -> RunnerReply:
        """The rows' results, and their mean FHE seconds per row (for the service's admission control).
        The service's call goes away when its client does or its time runs out: the rows not started then
        are dropped."""
        spec = self._spec(model)
        meta = spec.meta
        for ciphertext in ciphertexts:  # all of them before any row runs
            check_ciphertext(ciphertext, meta.ciphertext_bytes, meta.ciphertext_shape, model)
        scope = tenant_scope(spec.key_scope, tenant)
        work = asyncio.ensure_future(self.engine.run([(model, scope, key_id, ct, deadline) for ct in ciphertexts]))
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await ctx.request.is_disconnected():
                work.cancel()
                raise FHEBentoError(504, "request_timeout", "the caller went away")
        results = work.result()
        if any(result is None for result in results):
            raise FHEBentoError(504, "request_timeout", "the request's time ran out before all its rows started")
        return RunnerReply(payload=[r for r, _ in results], info={"row_seconds": sum(s for _, s in results) / len(results)})

    @bentoml.api
    async def predict(self, model: str, tenant: str, key_id: str | None, ciphertext: bytes, deadline: float,
                      ctx: bentoml.Context) -> RunnerReply:
        try:
            reply = await self._rows(model, tenant, key_id, [ciphertext], deadline, ctx)
            return reply.model_copy(update={"payload": reply.payload[0]})
        except FHEBentoError as exc:
            return RunnerReply.failed(exc)

    @bentoml.api
    async def predict_batch(self, model: str, tenant: str, key_id: str | None, ciphertexts: list[bytes],
                            deadline: float, ctx: bentoml.Context) -> RunnerReply:
        try:
            return await self._rows(model, tenant, key_id, ciphertexts, deadline, ctx)
        except FHEBentoError as exc:
            return RunnerReply.failed(exc)

    @bentoml.api
    async def register_key(self, model: str, tenant: str, key_id: str, staged_path: str) -> RunnerReply:
        """Check a spooled upload, deserialize it once in a throwaway process, then store it for the tenant;
        the caller deletes the spool file."""
        try:
            return RunnerReply(info=await self._register(self._spec(model), tenant, key_id, Path(staged_path)))
        except FHEBentoError as exc:
            metrics.KEY_UPLOADS.labels(model=model, outcome="rejected").inc()
            log.info("key upload rejected: model=%s code=%s", model, exc.code)
            return RunnerReply.failed(exc)

    async def _register(self, spec: ModelSpec, tenant: str, key_id: str, staged: Path) -> dict:
        scope = tenant_scope(spec.key_scope, tenant)
        size = staged.stat().st_size
        if await asyncio.to_thread(self.keys.has, scope, key_id):
            metrics.KEY_UPLOADS.labels(model=spec.name, outcome="exists").inc()
            return {"key_id": key_id, "bytes": size, "created": False}
        # Bounded by FHE_BENTO_MAX_KEY_BYTES at upload; the strict reader copies no blob.
        check_key(await asyncio.to_thread(staged.read_bytes), spec.meta.eval_key_bytes, spec.meta.key_shape, spec.name)
        await self.engine.verify_key(str(staged))
        info = {"model": spec.name, "bytes": size, "owner": tenant}
        created = await asyncio.to_thread(self.keys.put, scope, key_id, staged, info)
        metrics.KEY_UPLOADS.labels(model=spec.name, outcome="created" if created else "exists").inc()
        log.info("key registered: model=%s key_id=%s bytes=%d created=%s", spec.name, key_id, size, created)
        return {"key_id": key_id, "bytes": size, "created": created}
