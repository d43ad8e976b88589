"""The batch framing shared by the service and the client. Pure Python: no server imports.

A batch is `b"FHB1"`, a big-endian u32 row count, then for each row a big-endian u32 length and that
many bytes. Answers use the same framing, rows in request order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

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
