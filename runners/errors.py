"""The one error type the server raises on purpose, and its JSON shape.

Every 4xx/5xx the service sends is `{"error": {"code": ..., "message": ...}}`; the codes are listed in
the README. Runners return these errors in-band (see `RunnerReply`) so that the code survives the hop
between worker processes.
"""

from __future__ import annotations

from pydantic import BaseModel


# Every code the server sends, with its status: the README's error table lists exactly these (a test
# checks), and the fuzz tests check that every rejection is one of them.
ERROR_CODES: dict[str, int] = {
    **dict.fromkeys((
        "empty_body", "incomplete_body", "invalid_ciphertext", "invalid_batch", "invalid_key", "invalid_key_id",
        "missing_key_id", "invalid_multipart", "missing_field", "invalid_request", "invalid_attributes",
        "invalid_envelope", "invalid_part", "missing_parts", "digest_mismatch", "invalid_scope",
    ), 400),
    "auth_required": 401, "invalid_token": 401, "forbidden": 403,
    "unknown_model": 404, "unknown_key": 404, "method_not_allowed": 405,
    "body_timeout": 408, "payload_too_large": 413, "key_store_full": 413,
    "batch_too_long": 413,
    "unsupported_media_type": 415, "ciphertext_mismatch": 422, "key_mismatch": 422, "too_many_uploads": 429,
    "headers_too_large": 431,
    "not_ready": 503, "runner_unavailable": 503, "overloaded": 503, "request_timeout": 504,
}


class ErrorBody(BaseModel):
    code: str
    message: str


class FHEBentoError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __reduce__(self):  # errors raised in an engine process cross back to its runner worker
        return type(self), (self.status, self.code, self.message, self.headers)

    def body(self) -> dict:
        return {"error": ErrorBody(code=self.code, message=self.message).model_dump()}


def bad_request(code: str, message: str) -> FHEBentoError:
    return FHEBentoError(400, code, message)


def not_found(code: str, message: str) -> FHEBentoError:
    return FHEBentoError(404, code, message)


def too_large(message: str) -> FHEBentoError:
    return FHEBentoError(413, "payload_too_large", message)


def unprocessable(code: str, message: str) -> FHEBentoError:
    return FHEBentoError(422, code, message)


class RunnerReply(BaseModel):
    """What a runner method returns: a payload, or the error to send to the caller."""

    payload: bytes | list[bytes] | None = None
    info: dict | None = None
    status: int = 200
    error: ErrorBody | None = None
    headers: dict[str, str] = {}  # of the error answer (Retry-After)

    @classmethod
    def failed(cls, exc: FHEBentoError) -> "RunnerReply":
        return cls(status=exc.status, error=ErrorBody(code=exc.code, message=exc.message), headers=exc.headers)

    def unwrap(self) -> "RunnerReply":
        if self.error is not None:
            raise FHEBentoError(self.status, self.error.code, self.error.message, self.headers)
        return self
