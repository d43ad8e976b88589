"""A bound on key verifications: each deserializes an upload in a throwaway process, which costs about a
warm key of resident memory (400 MB for the demo XGB), so unbounded they let a few concurrent uploads
triple an instance's memory. At most `running` run at once per worker, at most `queued` wait, and
an upload past both gets 503 `overloaded` with a Retry-After, which the Python client honours."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fhe_bento.core import metrics
from fhe_bento.core.errors import FHEBentoError

SMOOTHING = 0.2  # weight of the newest verification in the moving average of its seconds


class VerifySlots:
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
