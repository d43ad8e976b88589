"""Key verification slots (runners/verification.py, `KeyVerifier.slot`): at most `running` verifications at
once, at most `queued` waiting, and the next one refused with 503 `overloaded` and a Retry-After of
(waiting + 1) x the moving average of a verification's seconds / running, rounded up."""

from __future__ import annotations

import asyncio

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.runners import verification
from fhe_bento.runners.verification import KeyVerifier


class Holders:
    """Verifications that take a slot (or wait for one) and hold it until `release`."""

    def __init__(self, verifier: KeyVerifier) -> None:
        self.verifier = verifier
        self.gate = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.active = 0
        self.peak = 0

    async def _hold(self) -> None:
        async with self.verifier.slot():
            self.active += 1
            self.peak = max(self.peak, self.active)
            await self.gate.wait()
            self.active -= 1

    async def start(self, count: int) -> None:
        self.tasks += [asyncio.create_task(self._hold()) for _ in range(count)]
        for _ in range(3):  # each task runs up to its first wait: a slot's body, or the queue
            await asyncio.sleep(0)

    async def release(self) -> None:
        self.gate.set()
        await asyncio.gather(*self.tasks)


async def refused(verifier: KeyVerifier) -> FHEBentoError:
    with pytest.raises(FHEBentoError) as refusal:
        async with verifier.slot():
            pass
    return refusal.value


def test_at_most_running_at_once_and_the_rest_wait_their_turn():
    outcome = {}

    async def scenario() -> None:
        holders = Holders(KeyVerifier(running=2, queued=3))
        await holders.start(5)
        outcome["active"] = holders.active
        await holders.release()
        outcome["peak"] = holders.peak
        outcome["done"] = sum(task.done() for task in holders.tasks)

    asyncio.run(scenario())
    assert outcome == {"active": 2, "peak": 2, "done": 5}


def test_past_running_and_queued_the_next_is_refused_with_503_overloaded():
    """2 running, 3 waiting, nothing measured yet (1 s a verification): Retry-After ceil(4 x 1 / 2) = 2."""
    outcome = {}

    async def scenario() -> None:
        holders = Holders(KeyVerifier(running=2, queued=3))
        await holders.start(5)
        outcome["error"] = await refused(holders.verifier)
        await holders.release()

    asyncio.run(scenario())
    error = outcome["error"]
    assert (error.code, error.status) == ("overloaded", 503)
    assert error.headers == {"Retry-After": "2"}
    assert error.message == "2 key verifications are running and 3 waiting; retry in 2 s"


def test_with_no_queue_a_verification_is_refused_only_while_every_slot_is_busy():
    outcome = {}

    async def scenario() -> None:
        verifier = KeyVerifier(running=1, queued=0)
        async with verifier.slot():
            outcome["busy"] = (await refused(verifier)).code
        async with verifier.slot():  # free again
            outcome["free"] = "admitted"

    asyncio.run(scenario())
    assert outcome == {"busy": "overloaded", "free": "admitted"}


def test_a_slot_is_freed_when_its_verification_fails():
    outcome = {}

    async def scenario() -> None:
        verifier = KeyVerifier(running=1, queued=0)
        with pytest.raises(ValueError):
            async with verifier.slot():
                raise ValueError("the key did not deserialize")
        async with verifier.slot():
            outcome["next"] = "admitted"

    asyncio.run(scenario())
    assert outcome == {"next": "admitted"}


def test_a_cancelled_waiter_gives_its_place_in_the_queue_back():
    outcome = {}

    async def scenario() -> None:
        holders = Holders(KeyVerifier(running=1, queued=1))
        await holders.start(2)  # one running, one waiting: the queue is full
        outcome["full"] = (await refused(holders.verifier)).code
        waiting = holders.tasks.pop()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await holders.start(1)  # takes the freed place instead of a 503
        outcome["queued_again"] = not holders.tasks[-1].done()
        await holders.release()
        outcome["peak"] = holders.peak

    asyncio.run(scenario())
    assert outcome == {"full": "overloaded", "queued_again": True, "peak": 1}


class Clock:
    """verification.py's `time`: each slot takes the seconds we say."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("durations", "retry_after"),
    [
        ([], 2),  # 1 s until one is measured: (1 waiting + 1) x 1 s / 1 slot
        ([11.0], 6),  # 0.8 x 1 + 0.2 x 11 = 3 s: 2 x 3
        ([11.0, 11.0], 10),  # 0.8 x 3 + 0.2 x 11 = 4.6 s: ceil(2 x 4.6)
    ],
)
def test_retry_after_follows_the_moving_average_of_a_verifications_seconds(
    monkeypatch, durations, retry_after
):
    clock = Clock()
    monkeypatch.setattr(verification, "time", clock)
    outcome = {}

    async def scenario() -> None:
        verifier = KeyVerifier(running=1, queued=1)
        for seconds in durations:
            async with verifier.slot():
                clock.now += seconds
        holders = Holders(verifier)
        await holders.start(2)
        outcome["error"] = await refused(verifier)
        await holders.release()

    asyncio.run(scenario())
    assert outcome["error"].headers == {"Retry-After": str(retry_after)}
