"""Pure wire rules: the batch framing both sides speak."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhe_bento.protocol import wire

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_batch_framing_round_trip():
    rows = [b"", b"x", bytes(range(256)) * 10]
    assert wire.decode_batch(wire.encode_batch(rows), max_rows=3) == rows


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NOPE", "starts with"),
        (wire.MAGIC + b"\x00", "truncated"),
        (wire.MAGIC + b"\x00\x00\x00\x00", "at least one"),
        (wire.MAGIC + b"\x00\x00\x00\x09", "at most"),
        (wire.MAGIC + b"\x00\x00\x00\x01\x00\x00\x00\x09abc", "ends before"),
        (wire.encode_batch([b"ab"]) + b"!", "stray"),
    ],
)
def test_batch_framing_rejects(data, message):
    with pytest.raises(wire.FramingError, match=message):
        wire.decode_batch(data, max_rows=8)
