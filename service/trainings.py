"""Training sessions: the encrypted weights of a training circuit, held by the server between steps.

A session is state documents in the key store (`keys/store.py`), so that it survives a restart and any
replica on the same store carries it on, under its owner's key scope (model version and tenant: another
tenant's request looks under another scope, and finds nothing):
    trainings/<scope>/<id>/session    the model version, the key id, when it started
    trainings/<scope>/<id>/step-<N>   the encrypted (weights, bias) after step N, and the digest of the
                                      batch that made it (none for step 0, the client's initial weights)
A step document is created once and never rewritten (`KeyStore.create_document`): of two steps racing
from step N, on one worker or on two replicas, exactly one creates step N + 1. The session's step is its
newest step document; older ones are deleted once a newer one exists. A step that fails, or whose process
dies, writes nothing: the session stays at its previous step.

This module holds the rules (ownership, the step a request may take, exactly once, the idle TTL); the
operations (`service/operations.py`) run the FHE step inside `step` and `record` its result. Store calls
(a file or an S3 request) run on a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel, ConfigDict, ValidationError

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import KeyStore

TRAINING_ID = re.compile(r"[0-9a-f]{32}")
PREFIX = "trainings/"
STEP_DIGITS = 10  # step documents sort by name in step order


class Session(BaseModel):
    training_id: str
    model: str  # the model version's tag: a session never moves to another version
    scope: str  # the owner's key scope (model version and tenant): another tenant's requests get 404
    key_id: str
    created: float

    def public(self, state: StepState) -> dict:
        """`GET .../trainings/{id}`."""
        return {
            "training_id": self.training_id,
            "model": self.model,
            "key_id": self.key_id,
            "step": state.step,
            "created": self.created,
            "updated": state.updated,
        }


class StepState(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")  # in its JSON document

    step: int
    weights: bytes
    bias: bytes
    batch_sha256: str | None  # the digest of the step's batch body (None at step 0)
    updated: float


def batch_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _folder(scope: str, training_id: str) -> str:
    return f"{PREFIX}{scope}/{training_id}/"


def _session_document(scope: str, training_id: str) -> str:
    return f"{_folder(scope, training_id)}session"


def _step_document(scope: str, training_id: str, step: int) -> str:
    return f"{_folder(scope, training_id)}step-{step:0{STEP_DIGITS}d}"


def step_conflict(step: int, why: str) -> FHEBentoError:
    return FHEBentoError("step_conflict", f"{why}; the session is at step {step}")


class TrainingBook:
    """The training sessions of one key store. `ttl_seconds`: sessions idle longer are removed (0: kept);
    `max_per_scope`: sessions one owner may hold at once."""

    def __init__(self, store: KeyStore, ttl_seconds: int, max_per_scope: int) -> None:
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.max_per_scope = max_per_scope
        self._running: set[str] = set()  # sessions with a step under way in this worker
        self._lock = threading.Lock()

    async def create(self, model: str, scope: str, key_id: str, weights: bytes, bias: bytes) -> Session:
        """A new session at step 0 with the client's encrypted initial weights; idle sessions go first."""
        return await asyncio.to_thread(self._create, model, scope, key_id, weights, bias)

    def _create(self, model: str, scope: str, key_id: str, weights: bytes, bias: bytes) -> Session:
        self.sweep()
        held = [name for name in self.store.list_documents(f"{PREFIX}{scope}/") if name.endswith("/session")]
        if len(held) >= self.max_per_scope:
            raise FHEBentoError(
                "too_many_trainings",
                f"this token holds {len(held)} training sessions of this model, the most it may: "
                "delete one (FHE_BENTO_MAX_TRAININGS_PER_SCOPE)",
            )
        now = time.time()
        session = Session(training_id=uuid.uuid4().hex, model=model, scope=scope, key_id=key_id, created=now)
        first = StepState(step=0, weights=weights, bias=bias, batch_sha256=None, updated=now)
        # The step document first: a session document is visible only with a step to read.
        self.store.create_document(
            _step_document(scope, session.training_id, 0), first.model_dump_json().encode()
        )
        self.store.create_document(
            _session_document(scope, session.training_id), session.model_dump_json().encode()
        )
        return session

    async def session(self, model: str, scope: str, training_id: str) -> tuple[Session, StepState]:
        """The session `training_id` of this model version and owner, and its newest step; 404
        unknown_training for another tenant's, another version's, a deleted or an expired session."""
        return await asyncio.to_thread(self._session, model, scope, training_id)

    def _session(self, model: str, scope: str, training_id: str) -> tuple[Session, StepState]:
        unknown = FHEBentoError(
            "unknown_training", f"no training session {training_id[:40]!r} for this model"
        )
        if not TRAINING_ID.fullmatch(training_id):
            raise unknown
        data = self.store.read_document(_session_document(scope, training_id))
        if data is None:
            raise unknown
        session = Session.model_validate_json(data)
        if session.model != model:
            raise unknown
        state = self._current(session)
        if self._expired(state):
            self._delete(session)
            raise unknown
        return session, state

    def _current(self, session: Session) -> StepState:
        """The session's newest step. A step deleted under the reader (a newer one was just recorded) is
        looked up again."""
        for _ in range(3):
            steps = self.store.list_documents(f"{_folder(session.scope, session.training_id)}step-")
            if steps and (data := self.store.read_document(steps[-1])) is not None:
                return StepState.model_validate_json(data)
        raise FHEBentoError("unknown_training", f"training session {session.training_id} was deleted")

    @asynccontextmanager
    async def step(self, session: Session, step: int, digest: str) -> AsyncIterator[StepState | None]:
        """Enter step `step` of `session` with the batch of digest `digest`: yields the state it starts
        from, or None when that very step was already applied (a retry: answer as before, apply nothing).
        409 step_conflict when `step` is not the session's, or a step of it is under way in this worker."""
        with self._lock:
            if session.training_id in self._running:
                raise step_conflict(step, f"a step of training session {session.training_id} is running")
            self._running.add(session.training_id)
        try:
            state = await asyncio.to_thread(self._current, session)
            if state.step == step + 1 and state.batch_sha256 == digest:
                yield None
            elif state.step != step:
                raise step_conflict(state.step, f"step {step} was asked")
            else:
                yield state
        finally:
            with self._lock:
                self._running.discard(session.training_id)

    async def record(self, session: Session, state: StepState) -> None:
        await asyncio.to_thread(self._record, session, state)

    def _record(self, session: Session, state: StepState) -> None:
        """Store `state` as the session's next step, exactly once: if another replica recorded that step
        first, this one is the same step only if it came from the same batch (then nothing changes),
        else 409 step_conflict."""
        if not self.store.create_document(
            _step_document(session.scope, session.training_id, state.step), state.model_dump_json().encode()
        ):
            winner = self._current(session)
            if winner.step != state.step or winner.batch_sha256 != state.batch_sha256:
                raise step_conflict(winner.step, f"another step {state.step} was recorded first")
            return
        self.store.delete_document(_step_document(session.scope, session.training_id, state.step - 1))

    async def delete(self, session: Session) -> None:
        await asyncio.to_thread(self._delete, session)

    def _delete(self, session: Session) -> None:
        """End a session: its documents, session first (the session is gone at once), then its steps."""
        self.store.delete_document(_session_document(session.scope, session.training_id))
        for name in self.store.list_documents(_folder(session.scope, session.training_id)):
            self.store.delete_document(name)

    def _expired(self, state: StepState, now: float | None = None) -> bool:
        return bool(self.ttl_seconds) and (now or time.time()) - state.updated > self.ttl_seconds

    def sweep(self) -> int:
        """Remove every session idle longer than the TTL (and a creation cut short before its session
        document); returns how many."""
        if not self.ttl_seconds:
            return 0
        removed, now = 0, time.time()
        by_session: dict[tuple[str, str], list[str]] = {}
        for name in self.store.list_documents(PREFIX):
            scope, training_id, _ = name[len(PREFIX) :].split("/", 2)
            by_session.setdefault((scope, training_id), []).append(name)
        for (scope, training_id), names in by_session.items():
            steps = [name for name in names if "/step-" in name]
            data = self.store.read_document(steps[-1]) if steps else b""
            if data is None:  # a newer step was recorded meanwhile: the session is in use
                continue
            try:
                idle = self._expired(StepState.model_validate_json(data), now)
            except ValidationError:  # no step left: a deletion cut short
                idle = True
            if idle:
                self.store.delete_document(_session_document(scope, training_id))
                for name in names:
                    self.store.delete_document(name)
                removed += 1
        return removed
