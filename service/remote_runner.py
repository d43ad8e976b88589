"""`RunnerAPI` over the network: the HTTP service's client of a runner served on its own
(`FHE_BENTO_RUNNER_URL`, `runners/fhe_runner.py`), through BentoML's client of that service.

Each method sends its typed request and raises the `Outcome`'s error, if any, as it came (the one place
errors come back from the network). Every call has a deadline (its request's own), and fails at once with
503 `runner_unavailable` while the runner is seen down, in flight or not yet sent. Down is what the
runner's BentoML `/readyz` says, asked on a connection of its own every `WATCH_SECONDS`, so that neither
`/ping` nor the watch ever waits behind queued calls. A runner served elsewhere is not this server's to
replace: while it is down, `/ping` answers 503 and nothing stops.

Idle connections: BentoML's client of the runner keeps pooled connections for aiohttp's default 15 s,
and BentoML has no setting for it; uvicorn closes idle ones after 5 s by default. The runner is therefore
served with a longer keep-alive than the pool's (`bentoml serve ... --timeout-keep-alive 60`,
`runtime/settings.RUNNER_KEEPALIVE_SECONDS`; tests/unit/test_library_assumptions.py fails if aiohttp's
default grows past it), so that the client side closes first. A call on a pooled connection that the
runner closed anyway fails before the runner reads the request, and is retried once; a timeout or a down
runner is not (the row may be computing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from fhe_bento.contract.errors import FHEBentoError, runner_unavailable
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
from fhe_bento.service.limits import request_deadline

log = logging.getLogger("bentoml.fhe_bento.service")
READYZ_TIMEOUT = 0.5  # seconds; SageMaker gives /ping 2 s
WATCH_SECONDS = 0.25
T = TypeVar("T")


def _forget(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


class RemoteRunner:
    def __init__(self, client: Any, url: str, request_timeout: float) -> None:
        """`client`: the `bentoml.depends(FHERunner, url=url)` proxy."""
        self.client = client
        self.request_timeout = request_timeout
        self._readyz = httpx.AsyncClient(base_url=url, timeout=READYZ_TIMEOUT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._up = False
        self._down: asyncio.Event | None = None  # set while a runner that was up is down
        self._watcher: asyncio.Future[None] | None = None

    # --- health ---------------------------------------------------------------------------------------

    async def _probe(self) -> bool | None:
        """True: ready; False: up, engine not ready; None: not answering."""
        try:
            return (await self._readyz.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return None

    def _watching(self) -> asyncio.Event:
        """The down flag, kept by a watch on the serving event loop (started by the first check or call;
        an in-process test client may open a loop per request, and gets a watch on each)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._down is None:
            self._loop, self._down = loop, asyncio.Event()
            self._watcher = asyncio.ensure_future(self._watch(self._down))
        return self._down

    async def _watch(self, down: asyncio.Event) -> None:
        while True:
            if await self._probe() is not None:
                self._up = True
                down.clear()
            elif self._up:  # only a runner that was up can be down
                down.set()
            await asyncio.sleep(WATCH_SECONDS)

    async def ready(self) -> bool:
        self._watching()
        return bool(await self._probe())

    # --- calls ----------------------------------------------------------------------------------------

    async def _call(self, name: str, send: Callable[[], Awaitable[Outcome[T]]]) -> T:
        down = self._watching()
        for attempt in (1, 2):
            if down.is_set():
                raise runner_unavailable("the FHE runner did not answer")
            try:
                outcome = await self._within_deadline(send(), down)
            except (FHEBentoError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.warning("runner call %s failed (attempt %d): %s", name, attempt, type(exc).__name__)
                if attempt == 2:
                    raise runner_unavailable("the FHE runner did not answer") from None
                continue
            return outcome.unwrap()
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _within_deadline(self, call: Awaitable[Outcome[T]], down: asyncio.Event) -> Outcome[T]:
        """`call`'s outcome, unless the request's time runs out or the runner goes down first. An abandoned
        call is cancelled, not awaited: a hung runner would hold the cancellation too."""
        pending = asyncio.ensure_future(call)
        seen_down = asyncio.ensure_future(down.wait())
        remaining = request_deadline(self.request_timeout) - time.time()
        try:
            await asyncio.wait(
                {pending, seen_down}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            seen_down.cancel()
            if not pending.done():  # also when this request is cancelled (its client went away): the runner
                pending.cancel()  # sees its caller leave and drops the rows not started
                pending.add_done_callback(_forget)
        if pending.done() and not pending.cancelled():
            return pending.result()
        if seen_down.done() and not seen_down.cancelled():
            raise runner_unavailable("the FHE runner did not answer")
        raise FHEBentoError("request_timeout", "the request's time ran out before the FHE runner answered")

    async def predict(self, rows: Rows) -> RowResults:
        return await self._call("predict", lambda: self.client.to_async.predict(rows=rows))

    async def register_key(self, upload: KeyUpload) -> KeyFacts:
        return await self._call("register_key", lambda: self.client.to_async.register_key(upload=upload))

    async def put_key_part(self, part: KeyPart) -> PartStored:
        return await self._call("put_key_part", lambda: self.client.to_async.put_key_part(part=part))

    async def key_parts(self, key: KeyRef) -> PartsHeld:
        return await self._call("key_parts", lambda: self.client.to_async.key_parts(key=key))

    async def complete_key(self, completion: KeyCompletion) -> KeyFacts:
        return await self._call(
            "complete_key", lambda: self.client.to_async.complete_key(completion=completion)
        )

    async def has_key(self, key: KeyRef) -> bool:
        return await self._call("has_key", lambda: self.client.to_async.has_key(key=key))

    async def delete_key(self, key: KeyRef) -> None:
        await self._call("delete_key", lambda: self.client.to_async.delete_key(key=key))

    async def list_keys(self) -> list[dict[str, Any]]:
        return await self._call("list_keys", self.client.to_async.list_keys)

    async def delete_any_key(self, key: ScopedKey) -> None:
        await self._call("delete_any_key", lambda: self.client.to_async.delete_any_key(key=key))
