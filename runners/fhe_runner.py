"""The FHE runner: a BentoML service whose workers check every ciphertext and key, then hand them to their
supervised engine processes (`runners/engine.py`), which hold the concrete-ml servers and the key cache.
It owns the keys too (`runners/key_service.py`), so it stands alone: `bentoml serve
fhe_bento.runners.fhe_runner:FHERunner` serves it on its own, and an HTTP service elsewhere reaches it with
`FHE_BENTO_RUNNER_URL`.

Its API methods are async: a worker only validates and relays, so its event loop stays free to beat the
heartbeat that the HTTP service reads (`core/heartbeat.py`) even while every core computes FHE. Methods
return a `RunnerReply` instead of raising, so that error codes cross the process hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import bentoml

from fhe_bento.core import metrics
from fhe_bento.core.errors import FHEBentoError
from fhe_bento.core.heartbeat import beat_forever
from fhe_bento.core.lifecycle import exit_nonzero_if_stopped, stop_server
from fhe_bento.core.model_repo import ModelSpec, load_specs
from fhe_bento.core.payload_check import check_ciphertext
from fhe_bento.core.runner_api import KeyPart, KeyUpload, Rows, RunnerReply
from fhe_bento.core.settings import Settings
from fhe_bento.runners.engine import Engine
from fhe_bento.runners.key_service import KeyService
from fhe_bento.runners.memory_plan import plan_memory
from fhe_bento.runners.verify_slots import VerifySlots

log = logging.getLogger("bentoml.fhe_bento.runner")
# The runner's composition root: BentoML declares the service at import, so the settings are read here,
# once per process, and passed down.
settings = Settings()
DISCONNECT_POLL_SECONDS = 0.5

exit_nonzero_if_stopped()  # also when the runner is served on its own


async def _reply(work: Callable[[], Awaitable[Any]], rejected_upload: str | None = None) -> RunnerReply:
    """`work()`'s answer as a reply (as its info unless it is one), or its error in-band. For a key upload
    of model `rejected_upload`, an error is counted and logged as a rejected upload."""
    try:
        answer = await work()
    except FHEBentoError as exc:
        if rejected_upload is not None:
            metrics.KEY_UPLOADS.labels(model=rejected_upload, outcome="rejected").inc()
            log.info("key upload rejected: model=%s code=%s", rejected_upload, exc.code)
        return RunnerReply.failed(exc)
    return answer if isinstance(answer, RunnerReply) else RunnerReply(info=answer)


# runner_connection: BentoML's client of this service (in the HTTP service) replaces its connection pool every
# 100 requests or 300 s by default, closing the connections of calls still in flight: about one call in 35
# failed with ServerDisconnectedError under load (and was run again). One pool for the worker's life.
@bentoml.service(
    name="fhe_runner",
    workers=settings.workers,
    traffic={"timeout": settings.request_timeout},
    runner_connection={"max_requests": 2**31 - 1, "max_age": float(2**31)},
)
class FHERunner:
    def __init__(self) -> None:
        self.specs = load_specs(settings)
        memory = plan_memory(settings, self.specs)
        self.engine = Engine(
            settings,
            give_up=stop_server,
            verify_slots=VerifySlots(memory.verifications, memory.queued_verifications),
        )
        self.keys = KeyService(settings, verify=self.engine.verify_key)
        self._heartbeat: asyncio.Future | None = None
        log.info(
            "FHE runner started: models=%s engine processes=%d omp_threads=%s memory=%d MB warm-key bound "
            "per engine=%d MB verifications=%d (+%d queued)",
            sorted(self.specs),
            settings.row_threads,
            settings.omp_threads_per_row(),
            memory.memory // 10**6,
            memory.key_cache_bytes // 10**6,
            memory.verifications,
            memory.queued_verifications,
        )

    @bentoml.on_startup
    async def start_heartbeat(self) -> None:
        """The liveness signal the HTTP service reads (`core/heartbeat.py`), beaten by this event loop."""
        self._heartbeat = asyncio.ensure_future(beat_forever(self.engine.ready))

    def __is_ready__(self) -> bool:  # BentoML's /readyz, for a runner served on its own
        return self.engine.ready()

    @bentoml.on_shutdown
    def stop_engine(self) -> None:
        """The worker is stopping: its engine processes end now, on purpose. Left to the interpreter's exit,
        they would end under a running monitor, which would take them for a crash and start new ones that
        hold the stop until SIGKILL."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.engine.shutdown()

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise FHEBentoError("unknown_model", f"no model named {name!r} is served") from None

    async def _rows(self, call: Rows, ctx: bentoml.Context | None) -> RunnerReply:
        """The rows' results, and their mean FHE seconds per row (for the service's admission control).
        The service's call goes away when its client does or its time runs out: the rows not started then
        are dropped."""
        spec = self._spec(call.model)
        meta = spec.meta
        for ciphertext in call.ciphertexts:  # all of them before any row runs
            check_ciphertext(ciphertext, meta.ciphertext_bytes, meta.ciphertext_shape, spec.name)
        scope = self.keys.scope(spec, call.tenant)
        work = asyncio.ensure_future(
            self.engine.run([(spec.name, scope, call.key_id, ct, call.deadline) for ct in call.ciphertexts])
        )
        try:
            while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_SECONDS))[0]:
                if ctx is not None and await ctx.request.is_disconnected():
                    raise FHEBentoError("request_timeout", "the caller went away")
        finally:
            work.cancel()  # a no-op once done; else (the caller left, or this call was cancelled) drops the rest
        results = [result for result in work.result() if result is not None]
        if len(results) < len(call.ciphertexts):
            raise FHEBentoError("request_timeout", "the request's time ran out before all its rows started")
        return RunnerReply(
            payload=[r for r, _ in results], info={"row_seconds": sum(s for _, s in results) / len(results)}
        )

    @bentoml.api
    # BentoML injects a parameter annotated exactly `bentoml.Context`: hence no `| None` on the default.
    async def predict(self, call: Rows, ctx: bentoml.Context = None) -> RunnerReply:  # type: ignore[assignment]
        async def one() -> RunnerReply:
            reply = await self._rows(call, ctx)
            assert isinstance(reply.payload, list)
            return reply.model_copy(update={"payload": reply.payload[0]})

        return await _reply(one)

    @bentoml.api
    async def predict_batch(self, call: Rows, ctx: bentoml.Context = None) -> RunnerReply:  # type: ignore[assignment]
        return await _reply(lambda: self._rows(call, ctx))

    # --- keys: every operation of the key service ------------------------------------------------------

    @bentoml.api
    async def register_key(self, upload: KeyUpload) -> RunnerReply:
        """Check a whole key, deserialize it once in a throwaway process, then store it for the tenant."""
        return await _reply(
            lambda: self.keys.register(self._spec(upload.model), upload.tenant, upload.key),
            rejected_upload=upload.model,
        )

    @bentoml.api
    async def put_key_part(self, part: KeyPart) -> RunnerReply:
        return await _reply(
            lambda: self.keys.put_part(
                self._spec(part.model), part.tenant, part.key_id, part.index, part.data
            )
        )

    @bentoml.api
    async def key_parts(self, model: str, tenant: str, key_id: str) -> RunnerReply:
        return await _reply(lambda: self.keys.parts(self._spec(model), tenant, key_id))

    @bentoml.api
    async def complete_key(self, model: str, tenant: str, key_id: str, count: int) -> RunnerReply:
        return await _reply(
            lambda: self.keys.complete(self._spec(model), tenant, key_id, count), rejected_upload=model
        )

    @bentoml.api
    async def has_key(self, model: str, tenant: str, key_id: str) -> RunnerReply:
        return await _reply(lambda: self.keys.has(self._spec(model), tenant, key_id))

    @bentoml.api
    async def delete_key(self, model: str, tenant: str, key_id: str) -> RunnerReply:
        return await _reply(lambda: self.keys.delete(self._spec(model), tenant, key_id))

    @bentoml.api
    async def list_keys(self) -> RunnerReply:
        return await _reply(self.keys.listing)

    @bentoml.api
    async def delete_any_key(self, scope: str, key_id: str) -> RunnerReply:
        return await _reply(lambda: self.keys.delete_in_scope(scope, key_id))
