"""SageMaker Batch Transform's records: JSON Lines, one object per line, answered line for line in order.

A record is `{"model": name (optional), "key_id": hex, "ciphertext": base64}`; its answer is
`{"result": base64}`, or `{"error": {"code", "message"}}` for a record that failed (the others still
run). Keys come from the shared key store, never from the records.
"""

from __future__ import annotations

import base64
import json

from pydantic import BaseModel, ConfigDict, ValidationError

CONTENT_TYPE = "application/jsonlines"
# Many records per request, each request at most this many MB: what the container's
# /execution-parameters asks for and what the client's jobs set.
MAX_PAYLOAD_MB = 1


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", val_json_bytes="base64")  # standard or URL-safe base64

    model: str | None = None
    key_id: str | None = None
    ciphertext: bytes


class RecordError(ValueError):
    pass


def encode_record(ciphertext: bytes, key_id: str | None, model: str | None = None) -> bytes:
    record = {"model": model, "key_id": key_id, "ciphertext": base64.b64encode(ciphertext).decode()}
    return json.dumps({name: value for name, value in record.items() if value is not None}).encode()


def decode_record(line: bytes) -> Record:
    try:
        return Record.model_validate_json(line)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise RecordError(f"{'.'.join(map(str, error['loc'])) or 'record'}: {error['msg']}") from None


def result_line(result: bytes) -> bytes:
    return json.dumps({"result": base64.b64encode(result).decode()}).encode()


def error_line(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def decode_answer(line: bytes) -> bytes | dict[str, str]:
    """A record's result, or its `{"code", "message"}` error."""
    answer = json.loads(line)
    return base64.b64decode(answer["result"]) if "result" in answer else answer["error"]


def lines(body: bytes) -> list[bytes]:
    """The non-empty lines of a JSON Lines body."""
    return [line for line in body.split(b"\n") if line.strip()]
