"""The client's one retry policy, whatever the transport: which answers are retried (overloaded, runner
restarting: `protocol.errors.is_retryable`), how long to wait first (the answer's Retry-After, or an
exponential backoff), and how many times. No transport retries on its own.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fhe_bento.client.answers import FHEServiceError
from fhe_bento.protocol.errors import is_retryable

T = TypeVar("T")
BACKOFF_BASE = 1.0  # seconds before the first retry of a retryable answer without Retry-After
BACKOFF_CAP = 30.0
JITTER = 1.5  # each wait is stretched by a random factor between 1 and this, so clients do not retry in step


@dataclass(frozen=True)
class RetryPolicy:
    """`policy(call)`: `call()`, retried on a retryable answer after its Retry-After (or an exponential
    backoff with jitter), at most `max_retries` times; any other error, or the last, reaches the caller."""

    max_retries: int = 8

    @staticmethod
    def retries(error: FHEServiceError) -> bool:
        """Whether this answer is worth another attempt: the server said it is busy or restarting."""
        return is_retryable(error.status, error.code)

    @staticmethod
    def delay(error: FHEServiceError, attempt: int) -> float:
        """Seconds to wait before retrying after the `attempt`-th failure (0 for the first)."""
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        return (error.retry_after or backoff) * random.uniform(1.0, JITTER)

    def __call__(self, call: Callable[[], T]) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except FHEServiceError as exc:
                if not self.retries(exc) or attempt == self.max_retries:
                    raise
                time.sleep(self.delay(exc, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")
