"""What crosses the boundary between the HTTP service and the FHE runner: the arguments and answers of
the runner's API. Bytes travel as base64 when a call is JSON (a runner reached by URL,
`FHE_BENTO_RUNNER_URL`); BentoML pickles only between the processes of one server. No path on either
side's disk ever crosses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from fhe_bento.core.errors import ErrorBody, FHEBentoError


class WireModel(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class Rows(WireModel):
    model: str
    tenant: str
    key_id: str | None
    ciphertexts: list[bytes]
    deadline: float  # epoch seconds: rows not started by then are dropped


class KeyUpload(WireModel):
    model: str
    tenant: str
    key: bytes


class KeyPart(WireModel):
    model: str
    tenant: str
    key_id: str
    index: int
    data: bytes


class RunnerReply(WireModel):
    """What a runner method returns: a payload, or the error to send to the caller."""

    # What these hold depends on the method (a row's result, a batch's, a key's facts): typed per method
    # only by the callers, in service/operations.py. The payload's type is declared so that JSON brings
    # bytes back as bytes, not as their base64 text.
    payload: bytes | list[bytes] | None = None
    info: Any = None
    error: ErrorBody | None = None
    headers: dict[str, str] = {}  # of the error answer (Retry-After)

    @classmethod
    def failed(cls, exc: FHEBentoError) -> RunnerReply:
        return cls(error=ErrorBody(code=exc.code, message=exc.message), headers=exc.headers)

    def unwrap(self) -> RunnerReply:
        if self.error is not None:
            raise FHEBentoError(self.error.code, self.error.message, self.headers)
        return self
