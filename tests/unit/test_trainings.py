"""The training-session rules (`service/trainings.py`) on a real `file://` store, and the client's batch
schedule (`client/training.py`): ownership, the step a request may take, exactly once under a race,
deletion and the idle TTL."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fhe_bento.client.training import Schedule
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.store import FileKeyStore
from fhe_bento.service.trainings import TrainingBook

MODEL, SCOPE, KEY = "m:v1", "a" * 64, "b" * 64


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def book(tmp_path) -> TrainingBook:
    return TrainingBook(FileKeyStore(tmp_path), ttl_seconds=3600, max_per_scope=3)


def test_a_session_starts_at_step_zero_and_belongs_to_its_model_and_scope(book: TrainingBook) -> None:
    session = run(book.create(MODEL, SCOPE, KEY, b"w0", b"b0"))
    found, state = run(book.session(MODEL, SCOPE, session.training_id))
    assert (found, state.step, state.weights, state.bias) == (session, 0, b"w0", b"b0")
    for model, scope, training_id in (
        ("m:v2", SCOPE, session.training_id),
        (MODEL, "c" * 64, session.training_id),
        (MODEL, SCOPE, "0" * 32),
        (MODEL, SCOPE, "../" + session.training_id),
    ):
        with pytest.raises(FHEBentoError) as caught:
            run(book.session(model, scope, training_id))
        assert caught.value.code == "unknown_training"


async def _take_step(book: TrainingBook, session, step: int, digest: str, weights: bytes) -> bool:
    """Step `step` with the batch `digest`: True if applied, False for a retry of the step just applied."""
    from fhe_bento.service.trainings import StepState

    async with book.step(session, step, digest) as state:
        if state is None:
            return False
        await book.record(
            session,
            StepState(step=step + 1, weights=weights, bias=b"b", batch_sha256=digest, updated=time.time()),
        )
        return True


def test_steps_go_in_order_and_a_retry_applies_nothing(book: TrainingBook) -> None:
    session = run(book.create(MODEL, SCOPE, KEY, b"w0", b"b0"))
    assert run(_take_step(book, session, 0, "d0", b"w1"))
    assert not run(_take_step(book, session, 0, "d0", b"other"))  # the same batch again
    for step, digest in ((0, "another batch"), (2, "d2")):
        with pytest.raises(FHEBentoError) as caught:
            run(_take_step(book, session, step, digest, b"x"))
        assert (caught.value.code, "at step 1" in caught.value.message) == ("step_conflict", True)
    assert run(book.session(MODEL, SCOPE, session.training_id))[1].weights == b"w1"
    assert book.store.list_documents(f"trainings/{SCOPE}/{session.training_id}/step-") == [
        f"trainings/{SCOPE}/{session.training_id}/step-0000000001"
    ]  # the older step is deleted once the newer one exists


def test_of_two_steps_racing_one_wins_and_the_other_gets_409(tmp_path) -> None:
    """Two books on one store, as two replicas: both enter step 0, both compute, one records."""
    from fhe_bento.service.trainings import StepState

    first, second = (TrainingBook(FileKeyStore(tmp_path), 0, 3) for _ in range(2))
    session = run(first.create(MODEL, SCOPE, KEY, b"w0", b"b0"))

    async def race() -> list[BaseException | None]:
        results: list[BaseException | None] = []
        async with first.step(session, 0, "mine") as state_a, second.step(session, 0, "theirs") as state_b:
            assert state_a is not None and state_b is not None
            for book, digest in ((first, "mine"), (second, "theirs")):
                try:
                    await book.record(
                        session,
                        StepState(step=1, weights=digest.encode(), bias=b"", batch_sha256=digest, updated=0),
                    )
                    results.append(None)
                except FHEBentoError as exc:
                    results.append(exc)
        return results

    won, lost = run(race())
    assert won is None and isinstance(lost, FHEBentoError) and lost.code == "step_conflict"
    assert run(second.session(MODEL, SCOPE, session.training_id))[1].weights == b"mine"


def test_a_step_under_way_in_this_worker_refuses_another(book: TrainingBook) -> None:
    session = run(book.create(MODEL, SCOPE, KEY, b"w0", b"b0"))

    async def overlap() -> str:
        async with book.step(session, 0, "d0"):
            with pytest.raises(FHEBentoError) as caught:
                async with book.step(session, 0, "d1"):
                    pass
            return caught.value.code

    assert run(overlap()) == "step_conflict"


def test_delete_and_the_idle_ttl_free_the_storage(tmp_path, monkeypatch) -> None:
    book = TrainingBook(FileKeyStore(tmp_path), ttl_seconds=60, max_per_scope=3)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 120)  # two sessions last used two minutes ago
    idle = [run(book.create(MODEL, SCOPE, KEY, b"w", b"b")) for _ in range(2)]
    monkeypatch.setattr(time, "time", lambda: now)
    with pytest.raises(FHEBentoError):
        run(book.session(MODEL, SCOPE, idle[0].training_id))  # expired: removed when found
    kept = run(book.create(MODEL, SCOPE, KEY, b"w", b"b"))  # a start sweeps the other idle one
    deleted = run(book.create(MODEL, SCOPE, KEY, b"w", b"b"))
    run(book.delete(run(book.session(MODEL, SCOPE, deleted.training_id))[0]))
    assert {name.split("/")[2] for name in book.store.list_documents("trainings/")} == {kept.training_id}


def test_a_scope_holds_at_most_its_sessions_and_a_deletion_frees_one(book: TrainingBook) -> None:
    held = [run(book.create(MODEL, SCOPE, KEY, b"w", b"b")) for _ in range(3)]
    with pytest.raises(FHEBentoError) as caught:
        run(book.create(MODEL, SCOPE, KEY, b"w", b"b"))
    assert caught.value.code == "too_many_trainings"
    run(book.create(MODEL, "c" * 64, KEY, b"w", b"b"))  # another owner is not counted
    run(book.delete(held[0]))
    run(book.create(MODEL, SCOPE, KEY, b"w", b"b"))


def test_each_epoch_takes_every_row_once_in_full_batches_and_is_repeatable() -> None:
    schedule = Schedule(n_rows=10, batch_size=4, epochs=3, seed=7)
    assert (schedule.per_epoch, schedule.steps) == (2, 6)
    for epoch in range(3):
        rows = np.concatenate([schedule.rows(2 * epoch + i) for i in range(2)])
        assert len(set(rows.tolist())) == 8 and rows.max() < 10
    again = Schedule(n_rows=10, batch_size=4, epochs=3, seed=7)
    assert all(np.array_equal(schedule.rows(k), again.rows(k)) for k in range(6))
    assert not np.array_equal(schedule.rows(0), Schedule(10, 4, 3, seed=8).rows(0))
    with pytest.raises(ValueError):
        Schedule(n_rows=3, batch_size=4, epochs=1, seed=0)
