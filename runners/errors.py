"""The one error type the server raises on purpose, and its JSON shape.

Every 4xx/5xx the service sends is `{"error": {"code": ..., "message": ...}}`; the codes are listed in
the README. Runners return these errors in-band (see `RunnerReply`) so that the code survives the hop
between worker processes.
"""

from __future__ import annotations

from pydantic import BaseModel


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

    @classmethod
    def failed(cls, exc: FHEBentoError) -> "RunnerReply":
        return cls(status=exc.status, error=ErrorBody(code=exc.code, message=exc.message))

    def unwrap(self) -> "RunnerReply":
        if self.error is not None:
            raise FHEBentoError(self.status, self.error.code, self.error.message)
        return self
