"""Admission control (service/admission.py): rows in flight per model, 503 `overloaded` past
FHE_BENTO_MAX_QUEUE_ROWS, 413 `batch_too_long` past what the request timeout allows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.models.repository import ModelMetadata, ModelSpec
from fhe_bento.service.admission import Admission


def spec(name: str, row_seconds: float) -> ModelSpec:
    """A served model as admission sees it: only its name and its seconds per row matter."""
    meta = ModelMetadata(
        model_class="XGBClassifier",
        n_features=1,
        n_outputs=1,
        client_sha256="0" * 64,
        needs_key=True,
        eval_key_bytes=1,
        key_shape=[],
        ciphertext_bytes=1,
        ciphertext_shape=[],
        warm_key_bytes=1,
        row_seconds=row_seconds,
        versions={},
        machine="x86_64",
    )
    return ModelSpec(name=name, version="1", path=Path("/nonexistent"), meta=meta)


def admitted(admission: Admission, model: ModelSpec, rows: int, in_flight: int = 0) -> int:
    """Admit `rows` of `model` while `in_flight` of its rows already are: the count seen inside."""

    async def attempt() -> int:
        async with admission.admit(model, in_flight), admission.admit(model, rows):
            return admission.in_flight[model.name]

    return asyncio.run(attempt())


def refusal(admission: Admission, model: ModelSpec, rows: int, in_flight: int = 0) -> FHEBentoError:
    """The error `admit` raises for `rows` of `model` while `in_flight` of its rows already are (fails the
    test if it admits them). A refused request leaves the count as it was."""

    async def attempt() -> FHEBentoError:
        async with admission.admit(model, in_flight):  # 0: nothing
            with pytest.raises(FHEBentoError) as refused:
                async with admission.admit(model, rows):
                    pass
            assert admission.in_flight[model.name] == in_flight
            return refused.value

    return asyncio.run(attempt())


def test_rows_are_counted_in_flight_per_model_and_released_after():
    admission = Admission(max_rows=8, timeout=600, parallelism=1, batch_parallelism=1)
    a, b = spec("a", 1.0), spec("b", 1.0)
    seen = []

    async def nested() -> None:
        async with admission.admit(a, 3):
            seen.append(dict(admission.in_flight))
            async with admission.admit(b, 5), admission.admit(a, 2):
                seen.append(dict(admission.in_flight))
            seen.append(dict(admission.in_flight))

    asyncio.run(nested())
    assert seen == [{"a": 3}, {"a": 5, "b": 5}, {"a": 3, "b": 0}]
    assert admission.in_flight == {"a": 0, "b": 0}


def test_rows_are_released_when_the_request_fails():
    admission = Admission(max_rows=8, timeout=600, parallelism=1, batch_parallelism=1)

    async def failing() -> None:
        async with admission.admit(spec("a", 1.0), 4):
            raise RuntimeError("the runner failed")

    with pytest.raises(RuntimeError):
        asyncio.run(failing())
    assert admission.in_flight["a"] == 0


def test_a_request_is_admitted_when_nothing_is_in_flight_even_past_the_limit():
    """A large batch is never starved: with an empty queue it gets in whatever its size."""
    admission = Admission(max_rows=4, timeout=600, parallelism=1, batch_parallelism=1)
    assert admitted(admission, spec("a", 1.0), 50) == 50
    assert admission.in_flight["a"] == 0


def test_a_full_queue_refuses_with_503_overloaded_and_retry_after():
    """Retry-After is rows in flight x seconds per row / parallelism, rounded up."""
    admission = Admission(max_rows=4, timeout=600, parallelism=2, batch_parallelism=1)
    error = refusal(admission, spec("a", 2.0), 2, in_flight=3)
    assert (error.code, error.status) == ("overloaded", 503)
    assert error.headers == {"Retry-After": "3"}  # ceil(3 rows x 2.0 s / 2)
    assert error.message == "model 'a' has 3 rows in flight (limit 4); retry in 3 s"


def test_up_to_the_limit_exactly_is_admitted():
    admission = Admission(max_rows=4, timeout=600, parallelism=2, batch_parallelism=1)
    assert admitted(admission, spec("a", 2.0), 1, in_flight=3) == 4


def test_retry_after_is_never_zero():
    admission = Admission(max_rows=1, timeout=600, parallelism=4, batch_parallelism=1)
    model = spec("fast", 0.0)  # a model so cheap its rows measure as no time at all
    assert refusal(admission, model, 1, in_flight=1).headers == {"Retry-After": "1"}
    assert Admission(max_rows=1, timeout=1, parallelism=1, batch_parallelism=1).retry_after("idle") == 1


def test_a_batch_longer_than_the_timeout_allows_is_refused_with_413_and_the_rows_that_fit():
    """floor(timeout / seconds per row) rows per engine process fit: 10 s at 3 s a row, 2 processes: 6."""
    admission = Admission(max_rows=100, timeout=10, parallelism=2, batch_parallelism=2)
    model = spec("slow", 3.0)
    assert admission.rows_that_fit(model) == 6
    error = refusal(admission, model, 7)
    assert (error.code, error.status) == ("batch_too_long", 413)
    assert error.message == (
        "7 rows of model 'slow' take about 21 s at 3.00 s per row; "
        "6 rows fit in FHE_BENTO_REQUEST_TIMEOUT (10 s): send smaller batches"
    )
    assert admitted(admission, model, 6) == 6  # exactly what fits


def test_rows_that_fit_uses_the_measured_seconds_per_row_once_there_is_one():
    admission = Admission(max_rows=100, timeout=10, parallelism=1, batch_parallelism=1)
    model = spec("m", 3.0)  # measured at import: 3 rows fit
    admission.observe("m", 5.0)  # the first measurement here replaces it outright
    assert admission.row_seconds["m"] == 5.0
    assert admission.rows_that_fit(model) == 2


def test_a_model_with_no_measured_time_fits_max_rows():
    admission = Admission(max_rows=17, timeout=10, parallelism=1, batch_parallelism=4)
    assert admission.rows_that_fit(spec("instant", 0.0)) == 17


def test_observe_keeps_a_moving_average_weighting_the_newest_by_a_fifth():
    admission = Admission(max_rows=8, timeout=600, parallelism=1, batch_parallelism=1)
    admission.observe("m", 1.0)
    admission.observe("m", 2.0)
    assert admission.row_seconds["m"] == pytest.approx(1.2)
    admission.observe("m", 2.0)
    assert admission.row_seconds["m"] == pytest.approx(1.36)
    admission.observe("other", 7.0)  # per model
    assert admission.row_seconds == pytest.approx({"m": 1.36, "other": 7.0})


def test_observe_averages_from_the_import_time_measurement_once_a_request_has_used_it():
    admission = Admission(max_rows=8, timeout=600, parallelism=1, batch_parallelism=1)
    admission.rows_that_fit(spec("m", 3.0))
    admission.observe("m", 1.0)
    assert admission.row_seconds["m"] == pytest.approx(2.6)  # 0.8 x 3.0 + 0.2 x 1.0


def test_retry_after_follows_the_measured_time_per_row():
    admission = Admission(max_rows=4, timeout=600, parallelism=1, batch_parallelism=1)
    admission.observe("a", 2.5)
    assert refusal(admission, spec("a", 1.0), 1, in_flight=4).headers == {"Retry-After": "10"}  # 4 x 2.5 s
