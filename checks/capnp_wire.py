"""A small, strict reader of Cap'n Proto's binary wire format, in pure Python.

concrete parses ciphertexts and evaluation keys in C++ without checking that a message has the layout its
own client writes (it copies payload blob i to offset i x 512 MiB of a buffer sized for the total, for
example), so a crafted message can corrupt memory. This module never hands bytes to concrete: it reads a
message the way the Cap'n Proto encoding spec defines it (segment table, struct, list, far pointers) and
returns its *shape*, a JSON-able tree that keeps everything but the contents of byte blobs:

    ["M", root, [segment sizes in words]]        the message
    ["S", data section hex, [pointer shapes]]     a struct
    ["F", shape]                                  reached through a (single) far pointer
    ["B", length]                                 a List(UInt8) / Data blob: its length only (with
                                                  `keep_blobs`, ["B", length, bytes], for tools that
                                                  rewrite messages)
    ["L", element size code, count, data hex]     a list of 1- to 64-bit primitives
    ["P", [pointer shapes]]                       a list of pointers
    ["C", data words, pointer words, [structs]]   a list of structs (composite)
    None                                          a null pointer

`checks/payloads.py` compares that shape with the one concrete-ml's client produces for a model.

Refused outright (`MalformedMessage`): a segment table that does not add up to the body's length (so a
truncated or padded message), more segments than `MAX_SEGMENTS`, any pointer or object out of bounds,
double-far pointers and capability pointers (concrete's messages have neither), two pointers that share or
overlap an object, nesting deeper than `MAX_DEPTH`, more than `MAX_OBJECTS` objects.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

MAX_SEGMENTS = 64
MAX_DEPTH = 32
MAX_OBJECTS = 10_000
_WORD = 8
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Bits per element for the list element size codes 0..5 (void, bit, byte, 2, 4 and 8 bytes).
_ELEMENT_BITS = (0, 1, 8, 16, 32, 64)
BYTE_LIST = 2
POINTER_LIST = 6
COMPOSITE_LIST = 7

Shape = Any  # the nested lists described in the module docstring


class MalformedMessage(ValueError):
    """Not a well-formed, canonical-enough Cap'n Proto message."""


def _signed30(value: int) -> int:
    return value - (1 << 30) if value >= 1 << 29 else value


class _Reader:
    def __init__(self, data: bytes | memoryview, keep_blobs: bool) -> None:
        self.data = memoryview(data)
        self.keep_blobs = keep_blobs
        self.segments = self._segment_table()
        self.claimed: list[tuple[int, int, int]] = []  # (segment, first word, end word) of every object

    def _segment_table(self) -> list[tuple[int, int]]:
        data = self.data
        if len(data) < 8:
            raise MalformedMessage("shorter than a segment table")
        count = _U32.unpack_from(data, 0)[0] + 1
        if count > MAX_SEGMENTS:
            raise MalformedMessage(f"{count} segments (at most {MAX_SEGMENTS})")
        header = 4 + 4 * count
        header += -header % _WORD
        if len(data) < header:
            raise MalformedMessage("truncated inside its segment table")
        sizes = struct.unpack_from(f"<{count}I", data, 4)
        if header + sum(sizes) * _WORD != len(data):
            raise MalformedMessage(
                f"the segment table says {header + sum(sizes) * _WORD} bytes, the message has {len(data)}"
            )
        segments, offset = [], header
        for size in sizes:
            segments.append((offset, size))
            offset += size * _WORD
        return segments

    def _claim(self, segment: int, start: int, words: int) -> None:
        _base, size = self.segments[segment]
        if start < 0 or start + words > size:
            raise MalformedMessage(f"an object at word {start} of segment {segment} runs out of it")
        if words:
            self.claimed.append((segment, start, start + words))
            if len(self.claimed) > MAX_OBJECTS:
                raise MalformedMessage(f"more than {MAX_OBJECTS} objects")

    def _word(self, segment: int, index: int) -> int:
        base, size = self.segments[segment]
        if not 0 <= index < size:
            raise MalformedMessage(f"a pointer at word {index} is outside segment {segment}")
        return _U64.unpack_from(self.data, base + index * _WORD)[0]

    def _bytes(self, segment: int, start: int, nbytes: int) -> memoryview:
        base, _ = self.segments[segment]
        return self.data[base + start * _WORD : base + start * _WORD + nbytes]

    def pointer(self, segment: int, index: int, depth: int) -> Shape:
        if depth > MAX_DEPTH:
            raise MalformedMessage(f"nested deeper than {MAX_DEPTH}")
        word = self._word(segment, index)
        if word == 0:
            return None
        kind = word & 3
        if kind == 2:
            if (word >> 2) & 1:
                raise MalformedMessage("double-far pointer")
            target_segment, pad = word >> 32, (word >> 3) & ((1 << 29) - 1)
            if target_segment >= len(self.segments):
                raise MalformedMessage(f"far pointer to segment {target_segment} of {len(self.segments)}")
            self._claim(target_segment, pad, 1)
            if self._word(target_segment, pad) & 3 == 2:
                raise MalformedMessage("a far pointer lands on another far pointer")
            return ["F", self.pointer(target_segment, pad, depth + 1)]
        if kind == 3:
            raise MalformedMessage("capability or reserved pointer")
        start = index + 1 + _signed30((word >> 2) & ((1 << 30) - 1))
        if kind == 0:
            data_words, pointer_words = (word >> 32) & 0xFFFF, word >> 48
            return self._struct(segment, start, data_words, pointer_words, depth)
        return self._list(segment, start, (word >> 32) & 7, word >> 35, depth)

    def _struct(self, segment: int, start: int, data_words: int, pointer_words: int, depth: int) -> Shape:
        self._claim(segment, start, data_words + pointer_words)
        pointers = [self.pointer(segment, start + data_words + i, depth + 1) for i in range(pointer_words)]
        return ["S", self._bytes(segment, start, data_words * _WORD).hex(), pointers]

    def _list(self, segment: int, start: int, element: int, count: int, depth: int) -> Shape:
        if element == COMPOSITE_LIST:
            self._claim(segment, start, 1 + count)  # the tag word, then `count` words of elements
            tag = self._word(segment, start)
            if tag & 3 != 0:
                raise MalformedMessage("a struct list's tag is not a struct tag")
            elements, data_words, pointer_words = (
                (tag >> 2) & ((1 << 30) - 1),
                (tag >> 32) & 0xFFFF,
                tag >> 48,
            )
            if elements * (data_words + pointer_words) != count:
                raise MalformedMessage("a struct list's tag does not match its word count")
            stride = data_words + pointer_words
            structs = []
            for i in range(elements):
                first = start + 1 + i * stride
                pointers = [
                    self.pointer(segment, first + data_words + k, depth + 1) for k in range(pointer_words)
                ]
                structs.append(["S", self._bytes(segment, first, data_words * _WORD).hex(), pointers])
            return ["C", data_words, pointer_words, structs]
        if element == POINTER_LIST:
            self._claim(segment, start, count)
            return ["P", [self.pointer(segment, start + i, depth + 1) for i in range(count)]]
        nbytes = (count * _ELEMENT_BITS[element] + 7) // 8
        self._claim(segment, start, (nbytes + _WORD - 1) // _WORD)
        if element == BYTE_LIST:
            return (
                ["B", count, bytes(self._bytes(segment, start, nbytes))] if self.keep_blobs else ["B", count]
            )
        return ["L", element, count, self._bytes(segment, start, nbytes).hex()]

    def check_no_overlap(self) -> None:
        claimed = sorted(self.claimed)
        for (seg_a, _, end_a), (seg_b, start_b, _) in itertools.pairwise(claimed):
            if seg_a == seg_b and start_b < end_a:
                raise MalformedMessage(f"two pointers share words of segment {seg_a} from word {start_b}")


def read_shape(data: bytes | memoryview, keep_blobs: bool = False) -> Shape:
    """The shape of one Cap'n Proto message (see the module docstring); raises MalformedMessage."""
    reader = _Reader(data, keep_blobs)
    if reader.segments[0][1] < 1:
        raise MalformedMessage("the first segment has no root pointer")
    reader._claim(0, 0, 1)
    root = reader.pointer(0, 0, 0)
    reader.check_no_overlap()
    return ["M", root, [size for _, size in reader.segments]]


def first_difference(got: Shape, want: Shape, path: str = "message") -> str | None:
    """Where two shapes first differ, as a path of list indexes, or None when they are equal."""
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return f"{path}: {len(got)} items where {len(want)} were expected"
        for index, (g, w) in enumerate(zip(got, want, strict=False)):
            if found := first_difference(g, w, f"{path}/{index}"):
                return found
        return None
    return None if got == want else f"{path}: {got!r} where {want!r} was expected"
