"""A strict reader of the TFHE-rs radix ciphertexts that concrete-ml's client sends for models compiled with
`ciphertext_format="tfhe-rs"` (8-bit tree classifiers), in pure Python.

concrete-ml-extensions' `encrypt_radix` serializes a tensor of 8-bit integers with bincode, flattened, each
integer a radix of shortint blocks (2 message bits each), each block one LWE ciphertext:

    u64 elements
    per element:   u64 blocks
                   per block:  u64 lwe_size, lwe_size x u64 (the LWE mask and body: the only free bytes),
                               BLOCK_TAIL bytes (ciphertext modulus, degree, noise level, message and carry
                               moduli, PBS order)
                   ELEMENT_TAIL bytes

(laid out from concrete-ml-extensions 0.1.9's output; `fhe-bento import` checks the model's own client's
ciphertexts against it). concrete's importer trusts these counts, so a request's ciphertext is read here
first and must have exactly the model's layout: counts, sizes and every byte outside the LWE words.
"""

from __future__ import annotations

import struct

from pydantic import BaseModel

BLOCK_TAIL = 60
ELEMENT_TAIL = 8
_WORD = 8
_U64 = struct.Struct("<Q")


class MalformedRadix(ValueError):
    """Not a well-formed radix ciphertext array."""


class RadixLayout(BaseModel):
    """Everything of a radix ciphertext array but its LWE words: what two ciphertexts of one model share."""

    elements: int
    blocks: int  # per element
    lwe_size: int  # u64 words per block
    block_tail: str  # hex, the same after every block
    element_tail: str  # hex, the same after every element

    @property
    def bytes(self) -> int:
        block = _WORD + self.lwe_size * _WORD + BLOCK_TAIL
        return _WORD + self.elements * (_WORD + self.blocks * block + ELEMENT_TAIL)


class _Reader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        if size > len(self.data) - self.offset:
            raise MalformedRadix(f"{what} at byte {self.offset} runs past the end ({len(self.data)} bytes)")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def count(self, what: str, smallest_item: int) -> int:
        """A u64 count of items of at least `smallest_item` bytes each: refused unless they can fit in what
        is left, so that no count makes the reader loop past the body."""
        value: int = _U64.unpack(self.take(_WORD, what))[0]
        if value == 0 or value > (len(self.data) - self.offset) // smallest_item:
            raise MalformedRadix(f"{what} {value} does not fit the {len(self.data)}-byte body")
        return value


def read_radix(data: bytes | memoryview) -> RadixLayout:
    """The layout of `data`; MalformedRadix unless it is a whole radix ciphertext array whose blocks and
    elements all have one layout."""
    reader = _Reader(data)
    elements = reader.count("element count", _WORD + ELEMENT_TAIL)
    blocks, sizes, block_tails, element_tails = set(), set(), set(), set()
    for _ in range(elements):
        count = reader.count("block count", 2 * _WORD + BLOCK_TAIL)
        blocks.add(count)
        for _ in range(count):
            lwe_size = reader.count("LWE size", _WORD)
            sizes.add(lwe_size)
            reader.take(lwe_size * _WORD, "LWE words")
            block_tails.add(bytes(reader.take(BLOCK_TAIL, "block tail")))
        element_tails.add(bytes(reader.take(ELEMENT_TAIL, "element tail")))
    if reader.offset != len(reader.data):
        raise MalformedRadix(f"{len(reader.data) - reader.offset} bytes follow the last element")
    if max(len(blocks), len(sizes), len(block_tails), len(element_tails)) != 1:
        raise MalformedRadix("its integers or blocks do not all have one layout")
    return RadixLayout(
        elements=elements,
        blocks=blocks.pop(),
        lwe_size=sizes.pop(),
        block_tail=block_tails.pop().hex(),
        element_tail=element_tails.pop().hex(),
    )


def first_difference(got: RadixLayout, expected: RadixLayout) -> str | None:
    """The first field in which `got` differs from `expected`, named; None when they are equal."""
    for name, value in expected:
        if getattr(got, name) != value:
            return f"{name} is {getattr(got, name)!r}, the model's is {value!r}"
    return None
