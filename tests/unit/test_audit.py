"""Audit lines (runtime/audit.py): one JSON object per line with exactly the audit fields, whatever the
record's message says, and the status and code of each way an operation ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.runtime import audit

TOKEN = "s3cr3t-token"
KEY_ID = "ab" * 32


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(audit.AuditFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def lines(monkeypatch) -> Lines:
    """The audit logger's lines, and none on the test's stdout."""
    monkeypatch.setattr(audit, "install", lambda: None)
    handler = Lines()
    audit.log.addHandler(handler)
    level = audit.log.level
    audit.log.setLevel(logging.INFO)
    yield handler
    audit.log.removeHandler(handler)
    audit.log.setLevel(level)


def test_a_line_is_one_json_object_with_the_audit_fields_and_nothing_else():
    record = logging.LogRecord(
        audit.AUDIT_LOGGER, logging.INFO, __file__, 1, "upload with %s", (TOKEN,), None
    )  # a message and arguments that must never be rendered
    for name, value in {"event": "key_upload", "tenant": "t" * 32, "rows": None, "status": 201}.items():
        setattr(record, name, value)
    record.ciphertext = b"\x00\x01"  # not an audit field
    line = audit.AuditFormatter().format(record)
    assert "\n" not in line and TOKEN not in line
    entry = json.loads(line)
    assert list(entry) == ["time", "level", "logger", *audit.FIELDS]
    assert entry["time"].endswith("Z") and entry["level"] == "INFO" and entry["logger"] == audit.AUDIT_LOGGER
    assert (entry["event"], entry["tenant"], entry["status"], entry["key_id"]) == (
        "key_upload",
        "t" * 32,
        201,
        None,
    )


def test_a_success_logs_the_status_the_operation_set(lines):
    with audit.audited(audit.Audit("key_upload", "tenant", "xgb", "v1")) as entry:
        entry.key_id, entry.status = KEY_ID, 201
    [line] = lines.entries()
    assert {k: line[k] for k in audit.FIELDS if k != "duration_ms"} == {
        "event": "key_upload",
        "tenant": "tenant",
        "model": "xgb",
        "version": "v1",
        "key_id": KEY_ID,
        "training_id": None,
        "step": None,
        "rows": None,
        "status": 201,
        "code": None,
    }
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0


def test_a_refusal_logs_its_status_and_code_and_goes_on(lines):
    with pytest.raises(FHEBentoError), audit.audited(audit.Audit("predict_batch", "", "xgb", "v1", rows=3)):
        raise FHEBentoError("unknown_key", "no such key")
    [line] = lines.entries()
    assert (line["event"], line["rows"], line["status"], line["code"]) == (
        "predict_batch",
        3,
        404,
        "unknown_key",
    )


@pytest.mark.parametrize(
    ("deadline", "status", "code"),
    [
        (None, 499, "client_closed"),
        (time.time() + 3600, 499, "client_closed"),  # the caller went away in time
        (time.time() - 1, 504, "request_timeout"),  # the request's time ran out
    ],
)
def test_a_cancelled_operation_is_a_caller_gone_or_a_timeout(lines, deadline, status, code):
    with pytest.raises(asyncio.CancelledError), audit.audited(audit.Audit("key_delete", ""), deadline):
        raise asyncio.CancelledError
    [line] = lines.entries()
    assert (line["status"], line["code"]) == (status, code)


def test_anything_unexpected_is_a_500(lines):
    with pytest.raises(RuntimeError), audit.audited(audit.Audit("key_delete", "")):
        raise RuntimeError(TOKEN)
    [line] = lines.entries()
    assert (line["status"], line["code"]) == (500, "internal_error")
    assert TOKEN not in lines.lines[0]


def test_install_writes_to_stdout_once_and_not_again_through_bentoml(monkeypatch):
    logger = logging.getLogger("bentoml.fhe_bento.audit.test")
    monkeypatch.setattr(audit, "log", logger)
    audit.install()
    audit.install()
    assert [type(h.formatter) for h in logger.handlers] == [audit.AuditFormatter]
    assert logger.propagate is False
    logger.handlers.clear()
