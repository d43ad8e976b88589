"""The FHE runner served on its own: `bentoml serve fhe_bento.runners.fhe_runner:FHERunner
--timeout-keep-alive 60`, for HTTP
services elsewhere that reach it with `FHE_BENTO_RUNNER_URL` (`service/remote_runner.py`).

Each method is one operation of `RunnerAPI` (`contract/runner_api.py`), carried out by a `Runner`
(`runners/runner.py`), with its answer or its error in an `Outcome`: this is the one place where errors are
put in-band, so that their codes cross the network. BentoML's `/readyz` is the runner's readiness, which the
HTTP services probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import bentoml

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import (
    KeyCompletion,
    KeyFacts,
    KeyPart,
    KeyRef,
    KeyUpload,
    Outcome,
    PartsHeld,
    PartStored,
    RowResults,
    Rows,
    ScopedKey,
)
from fhe_bento.models.repository import load_specs
from fhe_bento.runners.runner import Runner
from fhe_bento.runtime import staging
from fhe_bento.runtime.emf import start_exporter
from fhe_bento.runtime.lifecycle import exit_nonzero_if_stopped
from fhe_bento.runtime.settings import Settings

# This module is the standalone runner's composition root: BentoML declares the service at import, so the
# settings are read here, once per process, and passed down.
settings = Settings()
DISCONNECT_POLL_SECONDS = 0.5
T = TypeVar("T")

exit_nonzero_if_stopped()


async def _outcome(work: Awaitable[T]) -> Outcome[T]:
    try:
        return Outcome(value=await work)
    except FHEBentoError as exc:
        return Outcome.failed(exc)


async def _until_caller_leaves(ctx: bentoml.Context | None, work: Awaitable[T]) -> T:
    """`work`, cancelled if its caller (the HTTP service) goes away: its client left or its time ran out,
    so the rows not started are dropped."""
    task = asyncio.ensure_future(work)
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if ctx is not None and await ctx.request.is_disconnected():
                raise FHEBentoError("request_timeout", "the caller went away")
    finally:
        task.cancel()  # a no-op once done
    return task.result()


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
        staging.clear_stale(settings)  # the spool files a crashed process of this runner left behind
        self.runner = Runner(settings, load_specs(settings))
        self.emf = start_exporter(settings)  # CloudWatch EMF lines of this runner's metrics, in worker 1

    def __is_ready__(self) -> bool:  # BentoML's /readyz
        return self.runner.engine.ready()

    @bentoml.on_shutdown
    def stop_engine(self) -> None:
        """The worker is stopping: its engine processes end now, on purpose. Left to the interpreter's exit,
        they would end under a running supervisor, which would take them for a crash."""
        self.runner.shutdown()
        if self.emf is not None:
            self.emf.stop()

    @bentoml.api
    # BentoML injects a parameter annotated exactly `bentoml.Context`: hence no `| None` on the default.
    async def predict(self, rows: Rows, ctx: bentoml.Context = None) -> Outcome[RowResults]:  # type: ignore[assignment]
        return await _outcome(_until_caller_leaves(ctx, self.runner.predict(rows)))

    @bentoml.api
    async def register_key(self, upload: KeyUpload) -> Outcome[KeyFacts]:
        return await _outcome(self.runner.register_key(upload))

    @bentoml.api
    async def put_key_part(self, part: KeyPart) -> Outcome[PartStored]:
        return await _outcome(self.runner.put_key_part(part))

    @bentoml.api
    async def key_parts(self, key: KeyRef) -> Outcome[PartsHeld]:
        return await _outcome(self.runner.key_parts(key))

    @bentoml.api
    async def complete_key(self, completion: KeyCompletion) -> Outcome[KeyFacts]:
        return await _outcome(self.runner.complete_key(completion))

    @bentoml.api
    async def has_key(self, key: KeyRef) -> Outcome[bool]:
        return await _outcome(self.runner.has_key(key))

    @bentoml.api
    async def delete_key(self, key: KeyRef) -> Outcome[None]:
        return await _outcome(self.runner.delete_key(key))

    @bentoml.api
    async def list_keys(self) -> Outcome[list[dict[str, Any]]]:
        return await _outcome(self.runner.list_keys())

    @bentoml.api
    async def delete_any_key(self, key: ScopedKey) -> Outcome[None]:
        return await _outcome(self.runner.delete_any_key(key))
