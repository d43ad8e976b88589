"""The service's answers as every transport reads them, in one place: an error answer becomes an
`FHEServiceError` (with its Retry-After), and a batch of ciphertexts goes out and comes back in the one
framing of `protocol.wire`. The transports only carry bytes; none parses an error or frames a batch itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from fhe_bento.protocol import wire
from fhe_bento.protocol.errors import HTTP_ERROR, is_retryable

# The client's code for an error of a model container without the service's JSON error, as SageMaker
# reports any failure of the container (ModelError).
MODEL_ERROR = "model_error"


class FHEServiceError(RuntimeError):
    """An error answer of the service: HTTP status plus the JSON error code and message."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, from Retry-After on a retryable answer

    @property
    def retryable(self) -> bool:
        """`protocol.errors.is_retryable`: the rule the client's `RetryPolicy` follows."""
        return is_retryable(self.status, self.code)


def error_from_body(
    status: int, body: bytes | str, fallback_code: str, retry_after: float | None = None
) -> FHEServiceError:
    """The service error in a JSON error body, or `fallback_code` with the start of a body that is not one."""
    try:
        error = json.loads(body)["error"]
        return FHEServiceError(status, error["code"], error["message"], retry_after)
    except Exception:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return FHEServiceError(status, fallback_code, text[:200], retry_after)


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """Retry-After in seconds; None when it is absent or an HTTP date (the client then backs off itself)."""
    value = headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def raise_for_error(response: httpx.Response, fallback_code: str = HTTP_ERROR) -> httpx.Response:
    """`response` if it is not an error answer; else its `FHEServiceError` (`fallback_code` when its body
    is not the service's JSON error: a proxy's answer, or a container's seen as SageMaker would)."""
    if response.status_code < 400:
        return response
    raise error_from_body(
        response.status_code,
        response.content or response.reason_phrase,
        fallback_code,
        retry_after_seconds(response.headers),
    )


def batch_answer(body: bytes, sent: int) -> list[bytes]:
    """The answers framed in `body`, one per row of a batch of `sent` rows (never more)."""
    return wire.decode_batch(body, max_rows=sent)


def exchange_batch(rows: list[bytes], send: Callable[[bytes], bytes]) -> list[bytes]:
    """One batch request: `rows` framed into one body, `send` (which raises on an error answer), and the
    answer's rows."""
    return batch_answer(send(wire.encode_batch(rows)), len(rows))
