"""The one error type the server raises on purpose, and its JSON shape.

An error carries a code and a message; its HTTP status comes from the code, in the one registry
(`protocol.errors.ERROR_CODES`). Messages name no transport's headers or fields: the same error reaches
native, Zama-compatible and SageMaker callers. A runner served alone returns these errors in-band (an
`Outcome`, `contract/runner_api.py`) so that the code survives the network; engine processes pickle them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fhe_bento.protocol.errors import ERROR_CODES


class ErrorBody(BaseModel):
    code: str
    message: str


class FHEBentoError(Exception):
    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = ERROR_CODES[code]  # an unregistered code is a bug, caught by the tests
        self.code = code
        self.message = message
        self.headers = headers or {}

    def __reduce__(
        self,
    ) -> tuple[
        type[FHEBentoError], tuple[str, str, dict[str, str]]
    ]:  # errors raised in an engine process cross back to their supervisor
        return type(self), (self.code, self.message, self.headers)

    def body(self) -> dict[str, dict[str, Any]]:
        return {"error": ErrorBody(code=self.code, message=self.message).model_dump()}


# Seconds a client is told to wait before retrying while the FHE runner, or an engine process of it, is
# (re)starting: an engine process forks from a forkserver that has imported concrete, and loads its models
# in a second or two.
UNAVAILABLE_RETRY_AFTER = 5


def runner_unavailable(why: str) -> FHEBentoError:
    """503 `runner_unavailable`: `why` the runner cannot take the request now; the client retries."""
    return FHEBentoError(
        "runner_unavailable", f"{why}; retry", headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}
    )
