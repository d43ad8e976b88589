"""Admission control: a bounded amount of work per model, so overload gets a fast 503, not a long wait.

The HTTP service counts the rows it has handed to the runner and not yet answered, per model. A request
that would push the count past `FHE_BENTO_MAX_QUEUE_ROWS` is refused with 503 `overloaded` and a
`Retry-After` estimated from the recent time per row; a request always gets in when nothing is in flight,
so a large batch is never starved. Everything admitted runs to completion.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from runners import metrics
from runners.errors import FHEBentoError

SMOOTHING = 0.2  # weight of the newest observation in the moving average of seconds per row


class Admission:
    def __init__(self, max_rows: int, parallelism: int) -> None:
        self.max_rows = max_rows
        self.parallelism = parallelism
        self.in_flight: dict[str, int] = defaultdict(int)
        self.row_seconds: dict[str, float] = {}

    def retry_after(self, model: str) -> int:
        """Seconds until the queue has likely drained enough: queued rows x time per row / parallelism."""
        per_row = self.row_seconds.get(model, 1.0)
        return max(1, math.ceil(self.in_flight[model] * per_row / self.parallelism))

    @asynccontextmanager
    async def admit(self, model: str, rows: int) -> AsyncIterator[None]:
        if self.in_flight[model] and self.in_flight[model] + rows > self.max_rows:
            metrics.OVERLOADED.labels(model=model).inc()
            wait = self.retry_after(model)
            raise FHEBentoError(
                503, "overloaded",
                f"model {model!r} has {self.in_flight[model]} rows in flight (limit {self.max_rows}); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self.in_flight[model] += rows
        metrics.QUEUE_ROWS.labels(model=model).inc(rows)
        started = time.monotonic()
        try:
            yield
        finally:
            self.in_flight[model] -= rows
            metrics.QUEUE_ROWS.labels(model=model).dec(rows)
            per_row = (time.monotonic() - started) / rows
            previous = self.row_seconds.get(model, per_row)
            self.row_seconds[model] = (1 - SMOOTHING) * previous + SMOOTHING * per_row
