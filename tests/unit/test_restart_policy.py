"""The engine supervisor's restart rules (runners/supervisor.py, `RestartPolicy`): a process that had loaded
its models is always replaced; `max_failed_starts` starts in a row that die before they are ready give up."""

from __future__ import annotations

import pytest

from fhe_bento.runners.supervisor import RestartPolicy

CRASH = True  # a loaded process died (on a row)
FAILED_START = False  # a process died before it was ready


def decisions(max_failed_starts: int, exits: list[bool]) -> list[bool]:
    policy = RestartPolicy(max_failed_starts)
    return [policy.after_exit(loaded) for loaded in exits]


def test_a_loaded_process_that_crashes_is_always_replaced():
    assert decisions(3, [CRASH] * 100) == [True] * 100


def test_a_crash_resets_the_count_of_failed_starts():
    policy = RestartPolicy(max_failed_starts=3)
    assert [policy.after_exit(FAILED_START) for _ in range(2)] == [True, True]
    assert policy.failed == 2
    assert policy.after_exit(CRASH) is True
    assert policy.failed == 0


@pytest.mark.parametrize(
    ("max_failed_starts", "exits", "expected"),
    [
        (3, [FAILED_START] * 3, [True, True, False]),
        (1, [FAILED_START], [False]),
        # a start that succeeds in between begins the count again
        (3, [FAILED_START, FAILED_START, CRASH, FAILED_START, FAILED_START], [True] * 5),
        (3, [FAILED_START, FAILED_START, CRASH, *[FAILED_START] * 3], [True] * 5 + [False]),
    ],
)
def test_max_failed_starts_in_a_row_give_up(max_failed_starts, exits, expected):
    assert decisions(max_failed_starts, exits) == expected


def test_the_count_says_how_many_starts_failed_in_a_row_when_it_gives_up():
    """The supervisor's give-up message quotes `failed`."""
    policy = RestartPolicy(max_failed_starts=4)
    for _ in range(4):
        again = policy.after_exit(FAILED_START)
    assert (again, policy.failed) == (False, 4)
