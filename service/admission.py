"""Admission control: a bounded amount of work per model, so overload gets a fast 503, not a long wait.

The HTTP service counts the rows it has handed to the runner and not yet answered, per model. A request
that would push the count past `FHE_BENTO_MAX_QUEUE_ROWS` is refused with 503 `overloaded` and a
`Retry-After` estimated from the recent time per row; a request always gets in when nothing is in flight,
so a large batch is never starved.

A request whose rows cannot finish within `FHE_BENTO_REQUEST_TIMEOUT` at the model's seconds per row
(measured here as rows are answered; before that, measured at import) is refused up front with 413
`batch_too_long`, and the message says how many rows fit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelSpec
from fhe_bento.runtime import metrics

SMOOTHING = 0.2  # weight of the newest observation in the moving average of FHE seconds per row


class Admission:
    def __init__(self, max_rows: int, timeout: float, parallelism: int, batch_parallelism: int) -> None:
        self.max_rows = max_rows
        self.timeout = timeout
        self.parallelism = parallelism
        self.batch_parallelism = batch_parallelism  # rows of one batch computed at once (engine processes)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.row_seconds: dict[str, float] = {}

    def retry_after(self, model: str) -> int:
        """Seconds until the queue has likely drained enough: queued rows x time per row / parallelism."""
        per_row = self.row_seconds.get(model, 1.0)
        return max(1, math.ceil(self.in_flight[model] * per_row / self.parallelism))

    def observe(self, model: str, seconds_per_row: float) -> None:
        """Record the FHE seconds per row that the runner measured for an answered request."""
        previous = self.row_seconds.get(model, seconds_per_row)
        self.row_seconds[model] = (1 - SMOOTHING) * previous + SMOOTHING * seconds_per_row

    def rows_that_fit(self, spec: ModelSpec) -> int:
        """Rows of one request that finish within the request timeout at the model's seconds per row."""
        per_row = self.row_seconds.setdefault(spec.name, spec.meta.row_seconds)
        return math.floor(self.timeout / per_row) * self.batch_parallelism if per_row > 0 else self.max_rows

    def check_fits(self, spec: ModelSpec, rows: int) -> None:
        per_row = self.row_seconds.setdefault(spec.name, spec.meta.row_seconds)
        fit = self.rows_that_fit(spec)
        if rows > fit:
            raise FHEBentoError(
                "batch_too_long",
                f"{rows} rows of model {spec.name!r} take about {rows * per_row:.0f} s at {per_row:.2f} s per row; "
                f"{fit} rows fit in FHE_BENTO_REQUEST_TIMEOUT ({self.timeout:.0f} s): send smaller batches",
            )

    @asynccontextmanager
    async def admit(self, spec: ModelSpec, rows: int) -> AsyncIterator[None]:
        self.check_fits(spec, rows)
        model = spec.name
        if self.in_flight[model] and self.in_flight[model] + rows > self.max_rows:
            metrics.OVERLOADED.labels(model=model).inc()
            wait = self.retry_after(model)
            raise FHEBentoError(
                "overloaded",
                f"model {model!r} has {self.in_flight[model]} rows in flight (limit {self.max_rows}); "
                f"retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        self.in_flight[model] += rows
        metrics.QUEUE_ROWS.labels(model=model).inc(rows)
        try:
            yield
        finally:
            self.in_flight[model] -= rows
            metrics.QUEUE_ROWS.labels(model=model).dec(rows)
