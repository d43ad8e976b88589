"""The operations of the fhe-bento service, whatever the transport: one plain class.

The native routes (`service/routes.py`, `service/prediction_routes.py`), SageMaker's `/invocations`
(`service/sagemaker.py`) and the Zama-compatible routes (`service/compat.py`) get it by dependency
injection (`current_operations`, `operations_of`), read
their bodies by the one spec per operation (`service/bodies.py`), and call it. It holds no key state: every
key operation is a call to the FHE runner, which owns the keys (`keys/service.py`).
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI

from fhe_bento.checks.payloads import check_training_values
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import (
    KeyCompletion,
    KeyFacts,
    KeyPart,
    KeyRef,
    KeyUpload,
    PartsHeld,
    PartStored,
    Rows,
    RunnerAPI,
    ScopedKey,
)
from fhe_bento.keys.rules import check_key_id, check_key_size
from fhe_bento.keys.service import KeyService
from fhe_bento.keys.store_url import open_store
from fhe_bento.models.repository import ModelSpec, TrainingFacts
from fhe_bento.protocol import transform, wire
from fhe_bento.runtime import metrics
from fhe_bento.runtime.audit import Audit, audited
from fhe_bento.service.admission import Admission
from fhe_bento.service.auth import Caller
from fhe_bento.service.drain import Drain
from fhe_bento.service.limits import request_deadline
from fhe_bento.service.responses import registered_status
from fhe_bento.service.settings import ServiceSettings
from fhe_bento.service.trainings import Session, StepState, TrainingBook, batch_digest, step_conflict
from fhe_bento.service.versions import VersionBook

log = logging.getLogger("bentoml.fhe_bento.service")
# Errors of one bad row, which fail its whole batch: a transform runs such a batch again row by row.
ROW_ERRORS = frozenset({"invalid_ciphertext", "ciphertext_mismatch"})


def decode_rows(body: bytes, max_rows: int) -> list[bytes]:
    try:
        return wire.decode_batch(body, max_rows)
    except wire.FramingError as exc:
        raise FHEBentoError("invalid_batch", str(exc)) from None


class Operations:
    def __init__(
        self,
        runner: RunnerAPI,
        specs: dict[str, ModelSpec],
        default_name: str,
        settings: ServiceSettings,
        admission: Admission,
        drain: Drain | None = None,
    ) -> None:
        """`runner`: the FHE runner in this process, or the client of one served elsewhere; `specs`: every
        served version, by tag; `default_name`: the model of requests that name none; `drain`: the worker's
        (`service/drain.py`), none for a test's app that is never signalled."""
        self.runner = runner
        self.specs = specs
        self.default_name = default_name
        store = open_store(settings.key_store_url())
        self.versions = VersionBook(specs, store, settings.versions_refresh_seconds)
        self.trainings = TrainingBook(store, settings.training_ttl_seconds, settings.max_trainings_per_scope)
        self.settings = settings
        self.admission = admission
        self.drain = drain or Drain(settings.drain_seconds)
        # hybrid model -> module -> input shape (as concrete-ml's client writes it) -> its circuit
        self.hybrids: dict[str, dict[str, dict[str, ModelSpec]]] = {}
        for spec in specs.values():
            if spec.circuit:
                modules = self.hybrids.setdefault(spec.circuit.model, {})
                modules.setdefault(spec.circuit.module, {})[spec.circuit.shape] = spec

    def spec(self, name: str | None) -> ModelSpec:
        """The served version a request names (`name` or `name:version`, `service/versions.py`); the
        default model's default version for none."""
        return self.versions.resolve(self.default_name if name is None else name)

    @property
    def default(self) -> ModelSpec:
        return self.spec(None)

    def list_models(self) -> list[dict[str, Any]]:
        """Every served version, each saying whether it is its name's default and whether it is retired."""
        listed = []
        for spec in self.specs.values():
            state = self.versions.state(spec.name)
            default = spec.version == self.versions.default_version(spec.name)
            listed.append({**spec.public(), "default": default, "retired": spec.version in state.retired})
        return listed

    def describe(self, name: str) -> dict[str, Any]:
        """`GET /v1/models/{name}`: a model's default version (or the version named) with every served
        version, or a hybrid model's modules and shapes with their circuits."""
        if name in self.hybrids:
            return {
                "name": name,
                "hybrid": True,
                "modules": {
                    module: {shape: spec.public() for shape, spec in shapes.items()}
                    for module, shapes in self.hybrids[name].items()
                },
            }
        spec = self.spec(name)  # 404 or 410 as any request naming it
        return {**self.versions.describe(spec.name), **spec.public()}

    def hybrid(self, model: str) -> dict[str, dict[str, ModelSpec]]:
        """A hybrid model's circuits: module -> input shape -> spec."""
        try:
            return self.hybrids[model]
        except KeyError:
            raise FHEBentoError("unknown_model", f"no hybrid model named {model[:64]!r} is served") from None

    def module(self, model: str, module: str) -> dict[str, ModelSpec]:
        """One module's circuits: input shape -> spec."""
        try:
            return self.hybrid(model)[module]
        except KeyError:
            raise FHEBentoError(
                "unknown_module", f"hybrid model {model!r} has no module {module[:64]!r} in FHE"
            ) from None

    def circuit(self, model: str, module: str, shape: str) -> ModelSpec:
        """The circuit of one module for one input shape (`(1, 6, 32)`, as concrete-ml's client writes it)."""
        shapes = self.module(model, module)
        try:
            return shapes[shape]
        except KeyError:
            raise FHEBentoError(
                "unknown_shape",
                f"module {module!r} of {model!r} is not compiled for input shape {shape[:64]!r}; "
                f"it is for {sorted(shapes)}",
            ) from None

    async def ready(self) -> bool:
        """`/ping` and `/readyz`: the runner is ready and this worker is not draining."""
        return not self.drain.draining and await self.runner.ready()

    # --- predictions ----------------------------------------------------------------------------------

    async def predict(self, spec: ModelSpec, caller: Caller, key_id: str | None, ciphertext: bytes) -> bytes:
        return (await self.predict_batch(spec, caller, key_id, [ciphertext]))[0]

    async def predict_batch(
        self, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes]
    ) -> list[bytes]:
        """Every adapter's rows come here: a malformed key id is refused before any row is looked at."""
        deadline = request_deadline(self.settings.request_timeout)
        entry = Audit("predict_batch", caller.tenant, spec.name, spec.version, rows=len(rows))
        with audited(entry, deadline):
            if spec.meta.training:
                raise FHEBentoError(
                    "training_model", f"model {spec.name!r} is a training circuit: use its trainings routes"
                )
            entry.key_id = None if key_id is None else check_key_id(key_id)
            return await self._run_rows(spec, caller, entry.key_id, rows, deadline)

    async def _run_rows(
        self, spec: ModelSpec, caller: Caller, key_id: str | None, rows: list[bytes], deadline: float
    ) -> list[bytes]:
        """Rows (or a training step's one row) through admission to the runner, with the serving overhead
        measured."""
        started = time.perf_counter()
        call = Rows(model=spec.tag, tenant=caller.tenant, key_id=key_id, ciphertexts=rows, deadline=deadline)
        async with self.admission.admit(spec, len(rows)):
            done = await self.runner.predict(call)
        self.admission.observe(spec.name, done.row_seconds)
        overhead = time.perf_counter() - started - done.row_seconds * len(rows)
        metrics.SERVING_OVERHEAD.labels(model=spec.name, version=spec.version).observe(max(0.0, overhead))
        return done.results

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
                key_id = (await self.register_key(spec, caller, key)).key_id
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

    # --- training sessions (`service/trainings.py`) -----------------------------------------------------

    @staticmethod
    def _training_facts(spec: ModelSpec) -> TrainingFacts:
        if spec.meta.training is None:
            raise FHEBentoError(
                "not_training_model", f"model {spec.name!r} is an inference circuit: it takes no training"
            )
        return spec.meta.training

    @staticmethod
    def _values(body: bytes, what: str) -> list[bytes]:
        """The two values of a training body: [weights, bias] or a batch [x, y]."""
        values = decode_rows(body, 2)
        if len(values) != 2:
            raise FHEBentoError("invalid_batch", f"the body holds {what}: 2 values, not {len(values)}")
        return values

    async def start_training(
        self, spec: ModelSpec, caller: Caller, key_id: str | None, body: bytes
    ) -> Session:
        """A new session of `spec`'s training circuit from the body's encrypted [weights, bias], under a key
        the caller registered for this model version."""
        facts = self._training_facts(spec)
        with audited(Audit("training_start", caller.tenant, spec.name, spec.version, status=201)) as entry:
            weights, bias = self._values(body, "[weights, bias]")
            check_training_values([weights, bias], 2, facts, spec.name)
            if not key_id:
                raise FHEBentoError(
                    "missing_key_id", "a training session needs an evaluation key: send its id"
                )
            key = self._key(spec, caller, key_id)
            entry.key_id = key.key_id
            if not await self.runner.has_key(key):
                raise FHEBentoError(
                    "unknown_key", f"key {key.key_id} is not registered for model {spec.name!r}"
                )
            session = await self.trainings.create(
                spec.tag, KeyService.scope(spec, caller.tenant), key.key_id, weights, bias
            )
            entry.training_id = session.training_id
            return session

    async def training(self, spec: ModelSpec, caller: Caller, training_id: str) -> tuple[Session, StepState]:
        """A session of the caller's, and its newest step; 404 unknown_training for any other."""
        self._training_facts(spec)
        return await self.trainings.session(spec.tag, KeyService.scope(spec, caller.tenant), training_id)

    async def training_step(
        self, spec: ModelSpec, caller: Caller, training_id: str, step: int, body: bytes
    ) -> int:
        """Step `step` of a session with the body's encrypted batch [x, y], exactly once: the session's
        next step, or the same answer for a retry of the step just applied. Returns the session's step."""
        deadline = request_deadline(self.settings.request_timeout)
        entry = Audit("training_step", caller.tenant, spec.name, spec.version, rows=1, step=step)
        with audited(entry, deadline):  # a refused step (another tenant's session, say) is audited too
            session, _ = await self.training(spec, caller, training_id)
            entry.key_id, entry.training_id = session.key_id, training_id
            x, y = self._values(body, "a batch [x, y]")
            digest = batch_digest(body)
            async with self.trainings.step(session, step, digest) as state:
                if state is not None:  # else: a retry of the step just applied
                    row = wire.encode_batch([x, y, state.weights, state.bias])
                    (result,) = await self._run_rows(spec, caller, session.key_id, [row], deadline)
                    weights, bias = wire.decode_batch(result, 2)
                    await self.trainings.record(
                        session,
                        StepState(
                            step=step + 1,
                            weights=weights,
                            bias=bias,
                            batch_sha256=digest,
                            updated=time.time(),
                        ),
                    )
            return step + 1

    async def training_epoch(
        self, spec: ModelSpec, caller: Caller, training_id: str, step: int, body: bytes
    ) -> int:
        """Steps `step`, `step + 1`, ... of a session, one per batch of the body ([x1, y1, x2, y2, ...]), in
        order, each exactly once as `training_step` runs it: for the SageMaker asynchronous and Batch
        Transform paths, where one request may take minutes. A retry of the epoch after some of its steps
        were applied (the session is past `step`, and its last step came from this epoch's batch at that
        place) goes on from there. Returns the session's step."""
        values = decode_rows(body, 2 * self.settings.max_batch_rows)
        if not values or len(values) % 2:
            raise FHEBentoError("invalid_batch", f"an epoch holds batches [x, y, ...]: {len(values)} values")
        batches = [wire.encode_batch(values[i : i + 2]) for i in range(0, len(values), 2)]
        _, state = await self.training(spec, caller, training_id)
        done = state.step - step  # batches an earlier attempt of this epoch applied
        if done > 0 and (done > len(batches) or state.batch_sha256 != batch_digest(batches[done - 1])):
            raise step_conflict(state.step, f"an epoch from step {step} was asked")
        for index in range(max(done, 0), len(batches)):
            await self.training_step(spec, caller, training_id, step + index, batches[index])
        return step + len(batches)

    async def delete_training(self, spec: ModelSpec, caller: Caller, training_id: str) -> None:
        with audited(Audit("training_delete", caller.tenant, spec.name, spec.version, status=204)) as entry:
            session, _ = await self.training(spec, caller, training_id)
            entry.training_id = training_id
            await self.trainings.delete(session)

    # --- keys: each a call to the runner's key service ------------------------------------------------

    async def register_key(self, spec: ModelSpec, caller: Caller, key: bytes) -> KeyFacts:
        with audited(Audit("key_upload", caller.tenant, spec.name, spec.version)) as entry:
            facts = await self.runner.register_key(KeyUpload(model=spec.tag, tenant=caller.tenant, key=key))
            entry.key_id, entry.status = facts.key_id, registered_status(facts)
            return facts

    async def put_key_part(
        self, spec: ModelSpec, caller: Caller, key_id: str, index: int, data: bytes
    ) -> PartStored:
        key = self._key(spec, caller, key_id)
        return await self.runner.put_key_part(KeyPart(**key.model_dump(), index=index, data=data))

    async def key_parts(self, spec: ModelSpec, caller: Caller, key_id: str) -> PartsHeld:
        return await self.runner.key_parts(self._key(spec, caller, key_id))

    async def complete_key(self, spec: ModelSpec, caller: Caller, key_id: str, count: int) -> KeyFacts:
        """The end of a chunked key upload: audited as its key_upload."""
        with audited(Audit("key_upload", caller.tenant, spec.name, spec.version)) as entry:
            key = self._key(spec, caller, key_id)
            entry.key_id = key.key_id
            facts = await self.runner.complete_key(KeyCompletion(**key.model_dump(), count=count))
            entry.status = registered_status(facts)
            return facts

    async def has_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> bool:
        return await self.runner.has_key(self._key(spec, caller, key_id))

    async def delete_key(self, spec: ModelSpec, caller: Caller, key_id: str) -> None:
        with audited(Audit("key_delete", caller.tenant, spec.name, spec.version, status=204)) as entry:
            key = self._key(spec, caller, key_id)
            entry.key_id = key.key_id
            await self.runner.delete_key(key)

    async def list_keys(self) -> list[dict[str, Any]]:
        """Every stored key of every model and tenant (admin)."""
        return await self.runner.list_keys()

    async def delete_any_key(self, scope: str, key_id: str, caller: Caller | None = None) -> None:
        """Delete a key found with `list_keys` (admin: `caller`, audited as the tenant that deleted it)."""
        with audited(Audit("key_delete", caller.tenant if caller else None, status=204)) as entry:
            key = ScopedKey(scope=scope, key_id=check_key_id(key_id))
            entry.key_id = key.key_id
            await self.runner.delete_any_key(key)

    @staticmethod
    def _key(spec: ModelSpec, caller: Caller, key_id: str) -> KeyRef:
        return KeyRef(model=spec.tag, tenant=caller.tenant, key_id=check_key_id(key_id))


async def current_operations() -> Operations:
    """The serving service's operations: a FastAPI dependency, which in-process tests override (async: a
    plain function would run in FastAPI's thread pool, a thread hop per request)."""
    ops: Operations = bentoml.get_current_service().ops
    return ops


async def operations_of(app: FastAPI) -> Operations:
    """`current_operations` outside FastAPI's dependency injection (`service/prediction_routes.py`), overridden
    as the dependency is."""
    provider = app.dependency_overrides.get(current_operations, current_operations)
    ops = provider()
    found: Operations = await ops if inspect.isawaitable(ops) else ops
    return found
