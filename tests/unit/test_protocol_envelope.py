"""The asynchronous-inference envelope (protocol/wire.py): b"FHEENV1\\n", a big-endian u32 header length, a
JSON header {"model", "key_id", "key_bytes"} of at most 4096 bytes, the key bytes, then a batch. Also the
batch framing's truncation cases that test_protocol_wire.py leaves out."""

from __future__ import annotations

import struct

import pytest

from fhe_bento.protocol import wire

KEY_ID = "ab" * 32


def envelope_with_header(header: bytes, declared: int | None = None) -> bytes:
    """An envelope's start: the magic, a header length (`declared`, else the header's own) and the header."""
    length = len(header) if declared is None else declared
    return wire.ENVELOPE_MAGIC + struct.pack(">I", length) + header


def test_envelope_layout_is_magic_length_header_key_batch():
    """The exact bytes a client on another version has to produce."""
    header = b'{"model":"m","key_id":null,"key_bytes":2}'
    assert wire.encode_envelope([b"ab"], "m", None, b"kk") == (
        b"FHEENV1\n" + len(header).to_bytes(4, "big") + header + b"kk" + wire.encode_batch([b"ab"])
    )


@pytest.mark.parametrize(
    ("model", "key_id", "key"),
    [("breast-cancer-xgb", KEY_ID, b"\x00key\xff" * 100), (None, KEY_ID, b""), (None, None, b"")],
)
def test_envelope_round_trip(model, key_id, key):
    rows = [b"row one", b"", b"\x00" * 300]
    data = wire.encode_envelope(rows, model, key_id, key)
    header, offset = wire.read_envelope_header(data)
    assert (header.model, header.key_id, header.key_bytes) == (model, key_id, len(key))
    assert data[offset : offset + len(key)] == key
    assert wire.decode_batch(data[offset + len(key) :], max_rows=3) == rows


def test_the_header_parses_from_the_start_of_an_envelope_alone():
    """The service reads the header before the (large) key and batch have arrived."""
    data = wire.encode_envelope([b"x"], "m", KEY_ID, b"k" * 1000)
    header, offset = wire.read_envelope_header(data)
    assert wire.read_envelope_header(data[:offset]) == (header, offset)


def test_a_header_of_exactly_the_limit_is_accepted():
    header = b'{"model":"m"}'.ljust(wire.MAX_ENVELOPE_HEADER, b" ")
    parsed, offset = wire.read_envelope_header(envelope_with_header(header))
    assert parsed == wire.EnvelopeHeader(model="m", key_id=None, key_bytes=0)
    assert offset == len(wire.ENVELOPE_MAGIC) + 4 + wire.MAX_ENVELOPE_HEADER


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"", "an envelope starts with FHEENV1 and a header length"),
        (b"FHEENV2\n\x00\x00\x00\x02{}", "an envelope starts with FHEENV1 and a header length"),
        (wire.encode_batch([b"x"]), "an envelope starts with FHEENV1 and a header length"),
        (wire.ENVELOPE_MAGIC + b"\x00\x00\x00", "an envelope starts with FHEENV1 and a header length"),
        (
            envelope_with_header(b"{}".ljust(wire.MAX_ENVELOPE_HEADER + 1, b" ")),
            "the envelope header is too long or truncated",
        ),
        (envelope_with_header(b"{}", declared=3), "the envelope header is too long or truncated"),
        (envelope_with_header(b"{}", declared=0xFFFFFFFF), "the envelope header is too long or truncated"),
        (envelope_with_header(b"not json"), "bad envelope header: Invalid JSON"),
        (envelope_with_header(b"[1]"), "bad envelope header: Input should be an object"),
        (
            envelope_with_header(b'{"model":"m","extra":1}'),
            "bad envelope header: Extra inputs are not permitted",
        ),
        (
            envelope_with_header(b'{"key_bytes":-1}'),
            "bad envelope header: Input should be greater than or equal to 0",
        ),
        (
            envelope_with_header(b'{"key_bytes":"ten"}'),
            "bad envelope header: Input should be a valid integer",
        ),
        (envelope_with_header(b'{"model":3}'), "bad envelope header: Input should be a valid string"),
    ],
)
def test_envelope_header_rejects(head, message):
    with pytest.raises(wire.FramingError) as refused:
        wire.read_envelope_header(head)
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (wire.MAGIC + b"\x00\x00\x00\x01\x00\x00", "the batch is truncated at row 0"),
        (wire.MAGIC + b"\x00\x00\x00\x02\x00\x00\x00\x01x", "the batch is truncated at row 1"),
        (
            wire.MAGIC + b"\x00\x00\x00\x02\x00\x00\x00\x01x\x00\x00\x00\x05ab",
            "row 1 says 5 bytes but the batch",
        ),
        (wire.MAGIC + b"\x00\x00\x01\x01", "a batch holds at most 256 rows, this one says 257"),
        (wire.encode_batch([b"a", b"b"]) + b"xyz", "3 stray bytes after the last row"),
    ],
)
def test_batch_framing_names_where_it_broke(data, message):
    with pytest.raises(wire.FramingError) as refused:
        wire.decode_batch(data, max_rows=256)
    assert str(refused.value).startswith(message)


def test_a_batch_of_exactly_max_rows_is_accepted():
    assert wire.decode_batch(wire.encode_batch([b"r"] * 256), max_rows=256) == [b"r"] * 256
