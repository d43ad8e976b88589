"""SageMaker stateful sessions (protocol/sessions.py): the container answers `<id>; Expires=<UTC time>` in
X-Amzn-SageMaker-Session-Id; anything else is a ValueError."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fhe_bento.protocol.sessions import (
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    Session,
    parse_session,
)

EXPIRES = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_the_header_names_are_sagemakers():
    assert (SESSION_HEADER, NEW_SESSION_HEADER, NEW_SESSION) == (
        "X-Amzn-SageMaker-Session-Id",
        "X-Amzn-SageMaker-New-Session-Id",
        "NEW_SESSION",
    )


def test_a_session_header_is_id_and_utc_expiry():
    session = Session("a1.B2_c-3", EXPIRES)
    assert session.header() == "a1.B2_c-3; Expires=2030-01-02T03:04:05Z"
    assert parse_session(session.header()) == session


@pytest.mark.parametrize(
    "answer",
    [
        "abc; Expires=2030-01-02T03:04:05Z",
        "abc;Expires=2030-01-02T03:04:05Z",
        "abc;   Expires=2030-01-02T03:04:05Z",
        "  abc; Expires=2030-01-02T03:04:05Z \r\n",
    ],
)
def test_parse_session_tolerates_white_space(answer):
    assert parse_session(answer) == Session("abc", EXPIRES)


def test_a_session_id_is_at_most_256_characters():
    assert parse_session("x" * 256 + "; Expires=2030-01-02T03:04:05Z").id == "x" * 256
    with pytest.raises(ValueError):
        parse_session("x" * 257 + "; Expires=2030-01-02T03:04:05Z")


@pytest.mark.parametrize(
    "answer",
    [
        "",
        NEW_SESSION,
        "abc",
        "abc; Expires=",
        "; Expires=2030-01-02T03:04:05Z",
        "a b; Expires=2030-01-02T03:04:05Z",
        "a/b; Expires=2030-01-02T03:04:05Z",
        "abc; expires=2030-01-02T03:04:05Z",
        "abc Expires=2030-01-02T03:04:05Z",
        "abc; Expires=2030-01-02T03:04:05+01:00",
        "abc; Expires=2030-01-02 03:04:05Z",
        "abc; Expires=2030-13-02T03:04:05Z",
        "abc; Expires=Wed, 02 Jan 2030 03:04:05 GMT",
        "abc; Expires=2030-01-02T03:04:05Z; Path=/",
    ],
)
def test_anything_else_is_not_a_session_answer(answer):
    with pytest.raises(ValueError):
        parse_session(answer)


def test_a_session_expires_at_its_time_less_the_margin():
    now = datetime.now(UTC)
    assert Session("s", now - timedelta(seconds=1)).expired()
    assert not Session("s", now + timedelta(hours=1)).expired()
    assert not Session("s", now + timedelta(hours=1)).expired(margin_seconds=60)
    assert Session("s", now + timedelta(hours=1)).expired(margin_seconds=7200)
