"""The operations of the fhe-bento service, whatever the transport: one plain class.

The native routes (`service/routes.py`), SageMaker's `/invocations` (`service/sagemaker.py`) and the
Zama-compatible routes (`service/compat.py`) get it by dependency injection (`current_operations`), read
their bodies by the one spec per operation (`service/bodies.py`), and call it. It holds no key state: every
key operation is a call to the FHE runner, which owns the keys (`runners/key_service.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import bentoml

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.core.key_rules import check_key_id, check_key_size
from fhe_bento.core.model_repo import ModelSpec
from fhe_bento.core.runner_api import KeyPart, KeyUpload, Rows, RunnerReply
from fhe_bento.protocol import transform, wire
from fhe_bento.service.admission import Admission
from fhe_bento.service.auth import Caller
from fhe_bento.service.limits import request_deadline
from fhe_bento.service.runner_health import RunnerHealth
from fhe_bento.service.settings import ServiceSettings

log = logging.getLogger("bentoml.fhe_bento.service")
RUNNER_RETRY_AFTER = 5  # seconds a client is told to wait when the runner does not answer
# Errors of one bad row, which fail its whole batch: a transform runs such a batch again row by row.
ROW_ERRORS = frozenset({"invalid_ciphertext", "ciphertext_mismatch"})


def _runner_unavailable() -> FHEBentoError:
    return FHEBentoError(
        "runner_unavailable",
        "the FHE runner did not answer; retry",
        headers={"Retry-After": str(RUNNER_RETRY_AFTER)},
    )


def _forget(future: asyncio.Future) -> None:
    """Retrieve an abandoned call's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def decode_rows(body: bytes, max_rows: int) -> list[bytes]:
    try:
        return wire.decode_batch(body, max_rows)
    except wire.FramingError as exc:
        raise FHEBentoError("invalid_batch", str(exc)) from None


class Operations:
    def __init__(
        self,
        runner: Any,
        specs: dict[str, ModelSpec],
        default: ModelSpec,
        settings: ServiceSettings,
        admission: Admission,
        health: RunnerHealth,
    ) -> None:
        """`runner`: the FHE runner's client (`bentoml.depends`), or an `FHERunner` itself in process."""
        self.runner = runner
        self.health = health
        self.specs = specs
        self.default = default
        self.settings = settings
        self.admission = admission

    def spec(self, name: str | None) -> ModelSpec:
        if name is None:
            return self.default
        try:
            return self.specs[name]
        except KeyError:
            raise FHEBentoError("unknown_model", f"no model named {name!r} is served") from None

    def list_models(self) -> list[dict]:
        return [spec.public() for spec in self.specs.values()]

    async def call(self, method: str, **kwargs: Any) -> RunnerReply:
        """A runner call, its in-band error raised. Every call has a deadline (the request's own), and fails
        at once with 503 when the runner is seen down, in flight or not yet sent.

        A pooled connection that the runner closed as idle fails before the runner reads the request, so
        such a failure is retried once; a timeout or a down runner is not (the row may be computing)."""
        for attempt in (1, 2):
            if self.health.is_down():
                raise _runner_unavailable()
            try:
                reply = await self._within_deadline(getattr(self.runner.to_async, method)(**kwargs))
            except (FHEBentoError, asyncio.CancelledError):
                raise
            except Exception as exc:
                log.warning("runner call %s failed (attempt %d): %s", method, attempt, type(exc).__name__)
                if attempt == 2:
                    raise _runner_unavailable() from None
                continue
            return reply.unwrap()
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _within_deadline(self, call: Awaitable[RunnerReply]) -> RunnerReply:
        """`call`'s reply, unless the request's time runs out or the runner goes down first. An abandoned
        call is cancelled, not awaited: a hung runner would hold the cancellation too."""
        pending = asyncio.ensure_future(call)
        down = asyncio.ensure_future(self.health.wait_down())
        remaining = request_deadline(self.settings.request_timeout) - time.time()
        try:
            await asyncio.wait(
                {pending, down}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            down.cancel()
            if not pending.done():  # also when this request is cancelled (its client went away): the runner
                pending.cancel()  # sees its caller leave and drops the rows not started
                pending.add_done_callback(_forget)
        if pending.done() and not pending.cancelled():
            return pending.result()
        if down.done() and not down.cancelled():
            raise _runner_unavailable()
        raise FHEBentoError("request_timeout", "the request's time ran out before the FHE runner answered")

    # --- predictions ----------------------------------------------------------------------------------

    async def predict(self, spec: ModelSpec, caller: Caller, key_id: str | None, ciphertext: bytes) -> bytes:
        payload = (await self._rows("predict", spec, caller, key_id, [ciphertext])).payload
        assert isinstance(payload, bytes)
        return payload

    async def predict_batch(
        self, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes]
    ) -> list[bytes]:
        payload = (await self._rows("predict_batch", spec, caller, key_id, rows)).payload
        assert isinstance(payload, list)
        return payload

    async def _rows(
        self, method: str, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes]
    ) -> RunnerReply:
        call = Rows(
            model=spec.name,
            tenant=caller.tenant,
            key_id=key_id,
            ciphertexts=rows,
            deadline=request_deadline(self.settings.request_timeout),
        )
        async with self.admission.admit(spec, len(rows)):
            reply = await self.call(method, call=call)
        self.admission.observe(spec.name, reply.info["row_seconds"])
        return reply

    async def envelope(self, caller: Caller, path: Path, model: str | None, key_id: str | None) -> bytes:
        """Run a spooled async-inference envelope: its optional inline key (registered like an upload),
        then its batch. Returns the encoded results."""
        settings = self.settings
        with path.open("rb") as fh:
            try:
                header, offset = wire.read_envelope_header(
                    fh.read(len(wire.ENVELOPE_MAGIC) + 4 + wire.MAX_ENVELOPE_HEADER)
                )
            except wire.FramingError as exc:
                raise FHEBentoError("invalid_envelope", str(exc)) from None
            spec = self.spec(header.model or model)
            fh.seek(offset)
            key_id = header.key_id or key_id
            if header.key_bytes:
                check_key_size(header.key_bytes, settings.max_key_bytes)
                key = fh.read(header.key_bytes)
                if len(key) < header.key_bytes:
                    raise FHEBentoError("invalid_envelope", "the envelope ends inside its evaluation key")
                key_id = (await self.register_key(spec, caller, key))[0]["key_id"]
            rows_body = fh.read(settings.max_batch_bytes + 1)
        if len(rows_body) > settings.max_batch_bytes:
            raise FHEBentoError("payload_too_large", "the envelope's batch is over FHE_BENTO_MAX_BATCH_BYTES")
        results = await self.predict_batch(
            spec, caller, key_id, decode_rows(rows_body, settings.max_batch_rows)
        )
        return wire.encode_batch(results)

    async def transform(self, caller: Caller, body: bytes) -> bytes:
        """SageMaker Batch Transform's JSON Lines (`protocol/transform.py`): one answer line per record, in
        order. Consecutive records of one model and key run as batches; a batch that a bad record fails is
        run again record by record, so that only that record gets its error. Errors that are not a
        record's own (overloaded, runner unavailable, timeout) fail the whole request, which SageMaker
        retries."""
        answers: list[bytes | None] = []
        runs: list[tuple[ModelSpec, str | None, list[int], list[bytes]]] = []
        for line in transform.lines(body):
            try:
                record = transform.decode_record(line)
                spec = self.spec(record.model)
            except (transform.RecordError, FHEBentoError) as exc:
                code, message = (
                    (exc.code, exc.message)
                    if isinstance(exc, FHEBentoError)
                    else ("invalid_record", str(exc))
                )
                answers.append(transform.error_line(code, message))
                continue
            if not runs or runs[-1][:2] != (spec, record.key_id):
                runs.append((spec, record.key_id, [], []))
            runs[-1][2].append(len(answers))
            runs[-1][3].append(record.ciphertext)
            answers.append(None)
        if not answers:
            raise FHEBentoError("empty_body", "the body holds no JSON Lines record")
        for spec, key_id, indexes, rows in runs:
            size = max(
                1,
                min(
                    self.admission.rows_that_fit(spec),
                    self.settings.max_batch_rows,
                    self.settings.max_queue_rows,
                ),
            )
            for start in range(0, len(rows), size):
                results = await self._transform_rows(spec, caller, key_id, rows[start : start + size])
                for index, answer in zip(indexes[start : start + size], results, strict=False):
                    answers[index] = answer
        return b"".join(answer + b"\n" for answer in answers if answer is not None)  # all set by now

    async def _transform_rows(
        self, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes]
    ) -> list[bytes]:
        try:
            return [transform.result_line(r) for r in await self.predict_batch(spec, caller, key_id, rows)]
        except FHEBentoError as exc:
            if exc.status >= 500:
                raise
            if len(rows) == 1 or exc.code not in ROW_ERRORS:  # the same answer for every record of the run
                return [transform.error_line(exc.code, exc.message)] * len(rows)
        return [line for row in rows for line in await self._transform_rows(spec, caller, key_id, [row])]

    # --- keys: each a call to the runner's key service ------------------------------------------------

    async def register_key(self, spec: ModelSpec, caller: Caller, key: bytes) -> tuple[dict, int]:
        """Returns (answer, status): 201 when the key is new, 200 when it was registered already."""
        reply = await self.call(
            "register_key", upload=KeyUpload(model=spec.name, tenant=caller.tenant, key=key)
        )
        return _key_answer(reply.info)

    async def put_key_part(
        self, spec: ModelSpec, caller: Caller, key_id: str, index: int, data: bytes
    ) -> dict:
        part = KeyPart(
            model=spec.name, tenant=caller.tenant, key_id=check_key_id(key_id), index=index, data=data
        )
        return (await self.call("put_key_part", part=part)).info

    async def key_parts(self, spec: ModelSpec, caller: Caller, key_id: str) -> dict:
        return (await self.call("key_parts", **self._key(spec, caller, key_id))).info

    async def complete_key(
        self, spec: ModelSpec, caller: Caller, key_id: str, count: int
    ) -> tuple[dict, int]:
        return _key_answer(
            (await self.call("complete_key", count=count, **self._key(spec, caller, key_id))).info
        )

    async def has_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> bool:
        return bool((await self.call("has_key", **self._key(spec, caller, key_id))).info)

    async def delete_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> None:
        await self.call("delete_key", **self._key(spec, caller, key_id))

    async def list_keys(self) -> list[dict]:
        """Every stored key of every model and tenant (admin)."""
        return (await self.call("list_keys")).info

    async def delete_any_key(self, scope: str, key_id: str) -> None:
        """Delete a key found with `list_keys` (admin)."""
        await self.call("delete_any_key", scope=scope, key_id=check_key_id(key_id))

    @staticmethod
    def _key(spec: ModelSpec, caller: Caller, key_id: str) -> dict:
        return {"model": spec.name, "tenant": caller.tenant, "key_id": check_key_id(key_id)}


def _key_answer(info: dict) -> tuple[dict, int]:
    return {"key_id": info["key_id"], "bytes": info["bytes"]}, 201 if info["created"] else 200


def current_operations() -> Operations:
    """The serving service's operations: a FastAPI dependency, which in-process tests override."""
    return bentoml.get_current_service().ops
