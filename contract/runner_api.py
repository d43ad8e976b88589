"""The one boundary between the HTTP service and the FHE runner: one method per operation, each with a
typed request and a typed answer, and errors raised as `FHEBentoError` on both sides of it.

Two things implement `RunnerAPI`: the runner itself (`runners/runner.py`), which the HTTP service holds in
process in the usual co-located case, and the service's client of a runner served on its own
(`service/remote_runner.py`, `FHE_BENTO_RUNNER_URL`). Across that network hop, an answer travels as an
`Outcome` that carries either the value or the error, so that the error's code survives it: errors are
put into an outcome in one place (`runners/fhe_runner.py`) and raised from it in one place (`unwrap`).
Bytes travel as base64 in those JSON calls. No path on either side's disk ever crosses.
"""

from __future__ import annotations

from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from fhe_bento.contract.errors import ErrorBody, FHEBentoError

T = TypeVar("T")


class WireModel(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", frozen=True)


# --- requests ---------------------------------------------------------------------------------------
# `model` is always a served version's tag, `name:version` (`ModelSpec.tag`): several versions of one model
# may be served side by side.


class Rows(WireModel):
    """Ciphertexts to evaluate with one model and one key: one request's rows, answered in order."""

    model: str
    tenant: str
    key_id: str | None
    ciphertexts: list[bytes]
    deadline: float  # epoch seconds: rows not started by then are dropped


class KeyUpload(WireModel):
    model: str
    tenant: str
    key: bytes


class KeyRef(WireModel):
    """One stored key, as its owner names it."""

    model: str
    tenant: str
    key_id: str


class KeyPart(KeyRef):
    index: int
    data: bytes


class KeyCompletion(KeyRef):
    count: int


class ScopedKey(WireModel):
    """One stored key, as the admin listing names it."""

    scope: str
    key_id: str


# --- answers ----------------------------------------------------------------------------------------


class RowResults(WireModel):
    results: list[bytes]
    row_seconds: float  # mean FHE seconds per row, for the service's admission control


class KeyFacts(WireModel):
    key_id: str
    bytes: int
    created: bool  # False: it was registered already


class PartStored(WireModel):
    key_id: str
    part: int
    bytes: int


class PartsHeld(WireModel):
    key_id: str
    parts: list[int]
    bytes: int


class Outcome(WireModel, Generic[T]):
    """An answer across the network hop: its value, or its error."""

    value: T | None = None
    error: ErrorBody | None = None
    headers: dict[str, str] = {}  # of the error answer (Retry-After)

    @classmethod
    def failed(cls, exc: FHEBentoError) -> Outcome[T]:
        return cls(error=ErrorBody(code=exc.code, message=exc.message), headers=exc.headers)

    def unwrap(self) -> T:
        if self.error is not None:
            raise FHEBentoError(self.error.code, self.error.message, self.headers)
        return self.value  # type: ignore[return-value]  # None only where T admits it


class RunnerAPI(Protocol):
    """What the HTTP service asks of the FHE runner. Every method raises `FHEBentoError` for a refusal."""

    async def ready(self) -> bool:
        """Whether rows can run now (`/ping`): False while the engine starts or restarts."""

    async def predict(self, rows: Rows) -> RowResults: ...

    async def register_key(self, upload: KeyUpload) -> KeyFacts: ...

    async def put_key_part(self, part: KeyPart) -> PartStored: ...

    async def key_parts(self, key: KeyRef) -> PartsHeld: ...

    async def complete_key(self, completion: KeyCompletion) -> KeyFacts: ...

    async def has_key(self, key: KeyRef) -> bool: ...

    async def delete_key(self, key: KeyRef) -> None: ...

    async def list_keys(self) -> list[dict[str, Any]]: ...

    async def delete_any_key(self, key: ScopedKey) -> None: ...
