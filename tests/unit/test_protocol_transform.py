"""SageMaker Batch Transform records (protocol/transform.py): one JSON object a line,
`{"model"?, "key_id"?, "ciphertext": base64}`, answered line for line by `{"result": base64}` or
`{"error": {"code", "message"}}`."""

from __future__ import annotations

import pytest

from fhe_bento.protocol import transform
from fhe_bento.protocol.transform import Record, RecordError

KEY_ID = "cd" * 32


def test_a_record_holds_only_the_fields_it_has():
    assert transform.encode_record(b"\x00\x01", None) == b'{"ciphertext": "AAE="}'
    assert transform.encode_record(b"\x00\x01", KEY_ID, "m") == (
        b'{"model": "m", "key_id": "' + KEY_ID.encode() + b'", "ciphertext": "AAE="}'
    )


@pytest.mark.parametrize(("key_id", "model"), [(KEY_ID, "breast-cancer-xgb"), (KEY_ID, None), (None, None)])
def test_record_round_trip(key_id, model):
    ciphertext = bytes(range(256)) * 3
    assert transform.decode_record(transform.encode_record(ciphertext, key_id, model)) == Record(
        model=model, key_id=key_id, ciphertext=ciphertext
    )


@pytest.mark.parametrize("encoded", ["+/8=", "-_8="])
def test_a_ciphertext_may_be_standard_or_url_safe_base64(encoded):
    line = b'{"ciphertext": "' + encoded.encode() + b'"}'
    assert transform.decode_record(line).ciphertext == b"\xfb\xff"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{}", "ciphertext: Field required"),
        (b'{"key_id": "' + KEY_ID.encode() + b'"}', "ciphertext: Field required"),
        (b'{"ciphertext": "AAE=", "key": "AAE="}', "key: Extra inputs are not permitted"),
        (b'{"ciphertext": "!!"}', "ciphertext: Data should be valid base64"),
        (b'{"ciphertext": 7}', "ciphertext: Input should be a valid"),
        (b'{"ciphertext": "AAE=", "model": 1}', "model: Input should be a valid string"),
        (b"not json", "record: Invalid JSON"),
        (b'["AAE="]', "record: Input should be an object"),
    ],
)
def test_a_bad_record_names_its_field(line, message):
    with pytest.raises(RecordError) as refused:
        transform.decode_record(line)
    assert str(refused.value).startswith(message)


def test_answer_lines_round_trip():
    assert transform.result_line(b"\xfb\xff") == b'{"result": "+/8="}'
    assert transform.decode_answer(transform.result_line(b"\x00" * 40)) == b"\x00" * 40


def test_an_error_line_carries_the_code_and_message():
    line = transform.error_line("unknown_key", "no key with this id")
    assert line == b'{"error": {"code": "unknown_key", "message": "no key with this id"}}'
    assert transform.decode_answer(line) == {"code": "unknown_key", "message": "no key with this id"}


def test_lines_skips_blank_lines_and_tolerates_crlf():
    first = transform.encode_record(b"\x01", KEY_ID)
    second = transform.encode_record(b"\x02", None, "m")
    body = first + b"\r\n\n   \n" + second  # no newline after the last record
    assert transform.lines(body) == [first + b"\r", second]
    assert [transform.decode_record(line).ciphertext for line in transform.lines(body)] == [b"\x01", b"\x02"]
    assert transform.lines(b"") == [] and transform.lines(b"\n\n") == []
