"""Wire formats shared by the service and the client: batch framing and the async envelope.

A batch is `b"FHB1"`, a big-endian u32 row count, then for each row a big-endian u32 length and that
many bytes. Answers use the same framing, rows in request order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAGIC = b"FHB1"
_U32 = struct.Struct(">I")
CONTENT_TYPE = "application/vnd.fhe-bento.batch"


class FramingError(ValueError):
    pass


def encode_batch(rows: Sequence[bytes]) -> bytes:
    parts = [MAGIC, _U32.pack(len(rows))]
    for row in rows:
        parts += [_U32.pack(len(row)), row]
    return b"".join(parts)


def decode_batch(data: bytes, max_rows: int) -> list[bytes]:
    if not data.startswith(MAGIC):
        raise FramingError("a batch starts with the 4 bytes FHB1")
    if len(data) < 8:
        raise FramingError("the batch is truncated before its row count")
    (count,) = _U32.unpack_from(data, 4)
    if count == 0:
        raise FramingError("a batch holds at least one row")
    if count > max_rows:
        raise FramingError(f"a batch holds at most {max_rows} rows, this one says {count}")
    rows, offset = [], 8
    for index in range(count):
        if offset + 4 > len(data):
            raise FramingError(f"the batch is truncated at row {index}")
        (length,) = _U32.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise FramingError(f"row {index} says {length} bytes but the batch ends before")
        rows.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise FramingError(f"{len(data) - offset} stray bytes after the last row")
    return rows


# --- the asynchronous-inference envelope ------------------------------------------------------------
# b"FHEENV1\n", a big-endian u32 header length, a JSON header {"model", "key_id", "key_bytes"}, then
# `key_bytes` bytes of evaluation key (0: the key is already registered under key_id), then a batch.

ENVELOPE_MAGIC = b"FHEENV1\n"
ENVELOPE_CONTENT_TYPE = "application/vnd.fhe-bento.envelope"
MAX_ENVELOPE_HEADER = 4096


class EnvelopeHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    key_id: str | None = None
    key_bytes: int = Field(default=0, ge=0)


def encode_envelope(rows: Sequence[bytes], model: str | None, key_id: str | None, key: bytes = b"") -> bytes:
    header = EnvelopeHeader(model=model, key_id=key_id, key_bytes=len(key)).model_dump_json().encode()
    return ENVELOPE_MAGIC + _U32.pack(len(header)) + header + key + encode_batch(rows)


def read_envelope_header(head: bytes) -> tuple[EnvelopeHeader, int]:
    """Parse the start of an envelope; returns (header, offset of the key bytes)."""
    if not head.startswith(ENVELOPE_MAGIC) or len(head) < len(ENVELOPE_MAGIC) + 4:
        raise FramingError("an envelope starts with FHEENV1 and a header length")
    (length,) = _U32.unpack_from(head, len(ENVELOPE_MAGIC))
    start = len(ENVELOPE_MAGIC) + 4
    if length > MAX_ENVELOPE_HEADER or start + length > len(head):
        raise FramingError("the envelope header is too long or truncated")
    try:
        return EnvelopeHeader.model_validate_json(head[start : start + length]), start + length
    except ValidationError as exc:
        raise FramingError(f"bad envelope header: {exc.errors()[0]['msg']}") from None
