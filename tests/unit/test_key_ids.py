"""Key ids (protocol/keys.py, keys/rules.py): the lowercase hex SHA-256 of the key; a client's id is accepted
in either case and stored lowercase, and anything else is 400 `invalid_key_id`."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.rules import check_key_id, check_key_size
from fhe_bento.protocol.keys import is_key_id, key_id, parse_key_id, part_count

KEY_ID = hashlib.sha256(b"an evaluation key").hexdigest()
MIXED = "".join(c.upper() if i % 2 else c for i, c in enumerate(KEY_ID))
FULLWIDTH_ZERO = "\uff10"  # looks like 0
KELVIN = "\u212a"  # looks like K, lowercases to an ASCII k
DOTTED_I = "\u0130"  # lowercases to two characters
ARABIC_THREE = "\u0663"  # a decimal digit to str.isdigit

REFUSED = [
    pytest.param("", id="empty"),
    pytest.param(KEY_ID + "\n", id="trailing-newline"),
    pytest.param("\n" + KEY_ID, id="leading-newline"),
    pytest.param(" " + KEY_ID, id="leading-space"),
    pytest.param(KEY_ID + " ", id="trailing-space"),
    pytest.param(KEY_ID + "\x00", id="trailing-nul"),
    pytest.param(KEY_ID[:63], id="63-chars"),
    pytest.param(KEY_ID + "a", id="65-chars"),
    pytest.param("g" * 64, id="non-hex"),
    pytest.param("0x" + KEY_ID[:62], id="0x-prefix"),
    pytest.param(KEY_ID[:32] + "-" + KEY_ID[33:], id="dash"),
    pytest.param(FULLWIDTH_ZERO + KEY_ID[1:], id="fullwidth-digit"),
    pytest.param(KELVIN + KEY_ID[1:], id="kelvin-sign"),
    pytest.param(DOTTED_I + KEY_ID[2:], id="dotted-capital-i"),
    pytest.param(ARABIC_THREE + KEY_ID[1:], id="arabic-indic-digit"),
    pytest.param(KEY_ID[:63] + "\u00a0", id="no-break-space"),
]


def test_key_id_is_the_lowercase_hex_sha256_of_the_key():
    assert key_id(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert key_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("text", [KEY_ID, KEY_ID.upper(), MIXED])
def test_a_hex_id_in_either_case_parses_to_lowercase(text):
    assert parse_key_id(text) == KEY_ID
    assert check_key_id(text) == KEY_ID


@pytest.mark.parametrize("text", REFUSED)
def test_anything_else_is_not_a_key_id(text):
    assert parse_key_id(text) is None
    assert not is_key_id(text)


@pytest.mark.parametrize("text", REFUSED)
def test_check_key_id_refuses_with_400_invalid_key_id(text):
    with pytest.raises(FHEBentoError) as refused:
        check_key_id(text)
    assert (refused.value.code, refused.value.status) == ("invalid_key_id", 400)
    assert refused.value.message == "a key id is the 64-character hex SHA-256 of the key"


def test_is_key_id_accepts_only_the_stored_lowercase_form():
    """Names the server wrote itself are never uppercase: an uppercase one is not a stored id."""
    assert is_key_id(KEY_ID)
    assert not is_key_id(KEY_ID.upper()) and not is_key_id(MIXED)


@given(key=st.binary(min_size=32, max_size=32), upper=st.lists(st.booleans(), min_size=64, max_size=64))
def test_any_sha256_in_any_case_parses_to_its_lowercase_hex(key, upper):
    text = "".join(c.upper() if up else c for c, up in zip(key.hex(), upper, strict=True))
    assert parse_key_id(text) == key.hex()
    assert is_key_id(parse_key_id(text))


@given(st.text(max_size=70))
def test_whatever_parses_is_the_lowercased_text_and_a_stored_form(text):
    parsed = parse_key_id(text)
    assert parsed is None or (parsed == text.lower() and is_key_id(parsed))


@given(st.binary(max_size=256))
def test_a_keys_own_id_is_a_stored_id(key):
    assert is_key_id(key_id(key)) and parse_key_id(key_id(key)) == key_id(key)


@pytest.mark.parametrize(
    ("key_bytes", "part_bytes", "parts"),
    [(0, 5, 1), (1, 5, 1), (5, 5, 1), (6, 5, 2), (10, 5, 2), (11, 5, 3), (59_000_000, 5 * 1024 * 1024, 12)],
)
def test_part_count_is_the_key_size_over_the_part_size_rounded_up_and_at_least_one(
    key_bytes, part_bytes, parts
):
    assert part_count(key_bytes, part_bytes) == parts


def test_check_key_size_refuses_past_the_limit_with_413_payload_too_large():
    assert check_key_size(100, limit=100) is None  # the limit itself is allowed
    with pytest.raises(FHEBentoError) as refused:
        check_key_size(101, limit=100)
    assert (refused.value.code, refused.value.status) == ("payload_too_large", 413)
    assert refused.value.message == "a key is at most 100 bytes (FHE_BENTO_MAX_KEY_BYTES)"
