"""The strict reader of TFHE-rs radix ciphertexts (`checks/radix_wire.py`) and its rule
(`checks/payloads.check_radix`), on arrays built here byte by byte: no concrete."""

from __future__ import annotations

import struct

import pytest

from fhe_bento.checks.payloads import check_radix
from fhe_bento.checks.radix_wire import (
    BLOCK_TAIL,
    ELEMENT_TAIL,
    MalformedRadix,
    RadixLayout,
    first_difference,
    read_radix,
)
from fhe_bento.contract.errors import FHEBentoError

pytestmark = pytest.mark.unit

TAIL = bytes(range(BLOCK_TAIL))
END = bytes(ELEMENT_TAIL)


def radix(elements: int = 3, blocks: int = 4, lwe_size: int = 5, tail: bytes = TAIL) -> bytes:
    word = struct.Struct("<Q").pack
    block = word(lwe_size) + bytes(range(lwe_size * 8)) + tail
    return word(elements) + (word(blocks) + block * blocks + END) * elements


LAYOUT = RadixLayout(elements=3, blocks=4, lwe_size=5, block_tail=TAIL.hex(), element_tail=END.hex())


def test_a_well_formed_array_reads_to_its_layout_and_size() -> None:
    data = radix()
    assert read_radix(data) == LAYOUT
    assert LAYOUT.bytes == len(data)
    check_radix(data, LAYOUT, "m")  # the model's own layout passes


@pytest.mark.parametrize(
    "data",
    [
        radix()[:-1],  # truncated
        radix() + b"\0",  # a byte after the last element
        struct.pack("<Q", 2**60) + radix()[8:],  # a count past the body
        struct.pack("<Q", 0) + radix()[8:],  # no element
        radix()[:8] + struct.pack("<Q", 0) + radix()[16:],  # an element of no block
        radix()[:16] + struct.pack("<Q", 4) + radix()[24:],  # a block shorter than it says
        radix()[: -len(END) - BLOCK_TAIL] + bytes(BLOCK_TAIL) + END,  # one block of another tail
        b"",
        b"\xff" * 64,
    ],
)
def test_malformed_arrays_are_refused_with_400(data: bytes) -> None:
    with pytest.raises(MalformedRadix):
        read_radix(data)
    with pytest.raises(FHEBentoError) as refused:
        check_radix(data, LAYOUT, "m")
    assert (refused.value.status, refused.value.code) == (400, "invalid_ciphertext")


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (radix(elements=4), "bytes"),  # another width
        (radix(lwe_size=6), "bytes"),
        (radix(tail=bytes(BLOCK_TAIL)), "block_tail"),  # every block of another degree, say
    ],
)
def test_well_formed_arrays_of_another_model_are_refused_with_422(data: bytes, named: str) -> None:
    with pytest.raises(FHEBentoError) as refused:
        check_radix(data, LAYOUT, "m")
    assert (refused.value.status, refused.value.code) == (422, "ciphertext_mismatch")
    assert named in refused.value.message


def test_first_difference_names_the_field() -> None:
    assert first_difference(LAYOUT, LAYOUT) is None
    other = LAYOUT.model_copy(update={"blocks": 8})
    assert first_difference(other, LAYOUT) == "blocks is 8, the model's is 4"
