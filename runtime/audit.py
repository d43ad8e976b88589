"""Audit lines: one JSON object per line on the logger `bentoml.fhe_bento.audit` (stdout, as BentoML's own
log), for every key upload, key delete, prediction batch, and training start, step and delete that reaches
the service's operations (`service/operations.py`), whether it succeeds or is refused.

    {"time": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "bentoml.fhe_bento.audit",
     "event": "predict_batch", "tenant": "5f0c...", "model": "breast-cancer-xgb", "version": "n3x...",
     "key_id": "9a1e...", "rows": 8, "status": 200, "code": null, "duration_ms": 8123.4}

A line holds the fields of `FIELDS` and nothing else: the formatter never renders a message or its
arguments, so no ciphertext, key or token can reach it. `tenant` is the caller's tenant id (a hash of its
token; empty without tokens), `key_id` a key's SHA-256 once it has been parsed (null before), `status` the
HTTP status of the answer and `code` its error code (null on success).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol.errors import ERROR_CODES

AUDIT_LOGGER = "bentoml.fhe_bento.audit"
FIELDS = (
    "event",
    "tenant",
    "model",
    "version",
    "key_id",
    "training_id",
    "step",
    "rows",
    "status",
    "code",
    "duration_ms",
)
CLIENT_CLOSED = 499  # the caller went away (nginx's "client closed request"), as the access log says
INTERNAL_ERROR = 500

log = logging.getLogger(AUDIT_LOGGER)


@dataclass
class Audit:
    """One audited operation; `status` and `code` are set by `audited` when it ends."""

    event: str  # key_upload, key_delete, predict_batch, training_start, training_step, training_delete
    tenant: str | None
    model: str | None = None
    version: str | None = None
    key_id: str | None = None
    training_id: str | None = None
    step: int | None = None  # the step a training step asked for
    rows: int | None = None
    status: int = 200
    code: str | None = None


class AuditFormatter(logging.Formatter):
    """A record as one JSON object: its time, level and logger, then the `FIELDS` it carries (None when it
    has none). Nothing else of the record is rendered: not its message, not its arguments."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            **{name: getattr(record, name, None) for name in FIELDS},
        }
        return json.dumps(line, separators=(",", ":"), default=str)


def install() -> None:
    """The audit logger writes its JSON lines to stdout, and only there (not again as BentoML's text
    lines). Idempotent."""
    if any(isinstance(handler.formatter, AuditFormatter) for handler in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(AuditFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@contextmanager
def audited(entry: Audit, deadline: float | None = None) -> Iterator[Audit]:
    """Time the block and log `entry` when it ends: with its status as set by the block on success, or the
    refusal's status and code. A block cancelled is a request whose time ran out (`deadline`, wall clock:
    504 request_timeout) or whose caller went away (499 client_closed); anything unexpected is 500. The
    exception goes on."""
    install()
    started = time.perf_counter()
    try:
        yield entry
    except FHEBentoError as exc:
        entry.status, entry.code = exc.status, exc.code
        raise
    except asyncio.CancelledError:
        if deadline is not None and time.time() >= deadline:
            entry.status, entry.code = ERROR_CODES["request_timeout"], "request_timeout"
        else:
            entry.status, entry.code = CLIENT_CLOSED, "client_closed"
        raise
    except Exception:
        entry.status, entry.code = INTERNAL_ERROR, "internal_error"
        raise
    finally:
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        log.info(entry.event, extra={**asdict(entry), "duration_ms": duration_ms})
