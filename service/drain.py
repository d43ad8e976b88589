"""The drain: what a worker of the HTTP service does between SIGTERM and its exit.

SageMaker (an update, a scale-in) and every orchestrator stop an instance with SIGTERM, and SIGKILL it 30 s
later. BentoML's arbiter passes the signal to each worker (in the image too: its entrypoint `exec`s
`bentoml serve`, so the arbiter is PID 1). On it, a worker
- answers `/ping` and BentoML's `/readyz` 503 at once, so that the platform sends it no more traffic;
- answers every new request 503 `draining` with `Retry-After` (the client retries, and reaches another
  instance: `protocol.errors.RETRYABLE_CODES`);
- lets the requests in flight finish: their rows are answered, and a key upload completes (a store write
  is atomic, so one cut short by the bound leaves nothing a reader can see);
- once none is left, or after `FHE_BENTO_DRAIN_SECONDS` at most, hands the signal to uvicorn, which shuts
  down as usual (BentoML's shutdown hooks stop the engine processes), and logs what it drained.

The one lever is the signal handler: uvicorn installs its own before the app starts, and this replaces
it in the worker's main thread, keeping it to call once drained (`signal.signal`, public API).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from starlette.types import ASGIApp, Receive, Scope, Send

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.runtime import metrics
from fhe_bento.service.responses import error_response

log = logging.getLogger("bentoml.fhe_bento.service")
DRAIN_RETRY_AFTER = 1  # seconds: another instance takes the request, no need to wait for this one
POLL_SECONDS = 0.05
HEALTH_PATHS = frozenset({"/ping"})  # answered by their route, which asks `Drain.draining` (ready)


def draining_error() -> FHEBentoError:
    return FHEBentoError(
        "draining",
        "this instance is shutting down; retry, another instance will answer",
        headers={"Retry-After": str(DRAIN_RETRY_AFTER)},
    )


class Drain:
    """One worker's drain state: its requests in flight, and whether it is draining."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self.in_flight = 0
        self.refused = 0
        self.finished = 0  # requests that ended while draining

    def install(self) -> None:
        """From SIGTERM on, drain, then do what SIGTERM did before (uvicorn's shutdown). Called in the
        worker's main thread, with its event loop running (BentoML builds the service there)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM stops this worker without a drain")
            return
        loop = asyncio.get_running_loop()

        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.draining:
                self.draining = True
                loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(exit_as_before)))

        previous = signal.signal(signal.SIGTERM, handler)

        def exit_as_before() -> None:
            if callable(previous):
                previous(signal.SIGTERM, None)
            else:  # no handler before this one: end as SIGTERM would have
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

    async def _drain(self, then: Callable[[], None]) -> None:
        started = time.monotonic()
        running = self.in_flight
        log.info("SIGTERM: draining %d request(s) in flight (at most %.0f s)", running, self.seconds)
        while self.in_flight and time.monotonic() - started < self.seconds:
            await asyncio.sleep(POLL_SECONDS)
        outcome = "drained" if not self.in_flight else "timed_out"
        metrics.DRAINS.labels(outcome=outcome).inc()
        log.info(
            "drain %s in %.1f s: %d request(s) finished, %d refused, %d still running",
            outcome,
            time.monotonic() - started,
            self.finished,
            self.refused,
            self.in_flight,
        )
        then()


class DrainMiddleware:
    """Counts the requests in flight, and refuses new ones while draining (ASGI, outermost)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        drain = self.drain
        if drain.draining:
            drain.refused += 1
            await error_response(draining_error(), scope["method"])(scope, receive, send)
            return
        drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            drain.in_flight -= 1
            if drain.draining:
                drain.finished += 1
