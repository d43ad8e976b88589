"""Key verification: every upload is deserialized once, as concrete will, in a throwaway process
(`runners/engine_process.verify_main`) before it is stored, so that bytes that pass the Cap'n Proto checks
and still crash concrete cost a verifier, never an engine.

`KeyVerifier` bounds them: each deserializes an upload in a throwaway process, which costs about a
warm key of resident memory (400 MB for the demo XGB), so unbounded they let a few concurrent uploads
triple an instance's memory. At most `running` run at once per worker, at most `queued` wait, and
an upload past both gets 503 `overloaded` with a Retry-After, which the Python client honours."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.runners.engine_pipe import Child
from fhe_bento.runners.engine_process import verify_main
from fhe_bento.runtime import metrics

log = logging.getLogger("bentoml.fhe_bento.engine")
SMOOTHING = 0.2  # weight of the newest verification in the moving average of its seconds


class KeyVerifier:
    def __init__(self, running: int, queued: int) -> None:
        self.running = running
        self.queued = queued
        self._slots = asyncio.Semaphore(running)
        self._waiting = 0
        self._seconds = 1.0  # per verification, until one is measured

    def _retry_after(self) -> int:
        return max(1, math.ceil((self._waiting + 1) * self._seconds / self.running))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self._waiting >= self.queued:
            metrics.VERIFICATIONS_REFUSED.inc()
            wait = self._retry_after()
            raise FHEBentoError(
                "overloaded",
                f"{self.running} key verifications are running and {self._waiting} "
                f"waiting; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self._waiting += 1
        metrics.VERIFICATIONS.labels(state="queued").inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            metrics.VERIFICATIONS.labels(state="queued").dec()
        metrics.VERIFICATIONS.labels(state="running").inc()
        started = time.monotonic()
        try:
            yield
        finally:
            self._slots.release()
            metrics.VERIFICATIONS.labels(state="running").dec()
            self._seconds = (1 - SMOOTHING) * self._seconds + SMOOTHING * (time.monotonic() - started)

    async def verify(self, path: str) -> int:
        """Deserialize an upload in a throwaway process, once a verification slot is free (above);
        400 invalid_key if that process dies on it."""
        async with self.slot():
            verifier = await asyncio.to_thread(Child, "fhe-key-verifier", verify_main, path)
            try:
                await asyncio.to_thread(verifier.answered)
                ok, value = verifier.receive()
            except EOFError:
                log.warning("the key verifier died on an upload: refused")
                raise FHEBentoError(
                    "invalid_key", "the body is not a serialized concrete evaluation key"
                ) from None
            finally:
                # Its memory is back before the slot is free for the next one (waited for off the event loop).
                await asyncio.to_thread(verifier.stop)
            if not ok:
                raise value
            return int(value)
