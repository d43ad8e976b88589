"""Test tooling: write a Cap'n Proto message from a shape read with `read_shape(..., keep_blobs=True)`,
as one segment, so that tests can rewrite real ciphertexts and keys the way an attacker would."""

from __future__ import annotations

import struct

from runners.capnp_wire import COMPOSITE_LIST, POINTER_LIST, Shape

_MASK32 = (1 << 32) - 1


class _Writer:
    def __init__(self) -> None:
        self.words = bytearray(8)  # word 0: the root pointer

    def alloc(self, words: int) -> int:
        start = len(self.words) // 8
        self.words += bytes(8 * words)
        return start

    def put(self, index: int, value: int) -> None:
        struct.pack_into("<Q", self.words, index * 8, value)

    def struct_pointer(self, at: int, start: int, data_words: int, pointer_words: int) -> None:
        offset = start - at - 1 if data_words or pointer_words else -1  # an empty struct is not null
        self.put(at, ((offset << 2) & _MASK32) | data_words << 32 | pointer_words << 48)

    def list_pointer(self, at: int, start: int, element: int, count: int) -> None:
        self.put(at, ((((start - at - 1) << 2) | 1) & _MASK32) | element << 32 | count << 35)

    def pointer(self, at: int, shape: Shape) -> None:
        if shape is None:
            return
        kind = shape[0]
        if kind == "F":  # one segment: no far pointers needed
            self.pointer(at, shape[1])
        elif kind == "S":
            data, pointers = bytes.fromhex(shape[1]), shape[2]
            start = self.alloc(len(data) // 8 + len(pointers))
            self.words[start * 8 : start * 8 + len(data)] = data
            self.struct_pointer(at, start, len(data) // 8, len(pointers))
            for index, child in enumerate(pointers):
                self.pointer(start + len(data) // 8 + index, child)
        elif kind == "B":
            count, content = shape[1], shape[2]
            start = self.alloc((count + 7) // 8)
            self.words[start * 8 : start * 8 + count] = content[:count].ljust(count, b"\0")
            self.list_pointer(at, start, 2, count)
        elif kind == "L":
            element, count, data = shape[1], shape[2], bytes.fromhex(shape[3])
            start = self.alloc((len(data) + 7) // 8)
            self.words[start * 8 : start * 8 + len(data)] = data
            self.list_pointer(at, start, element, count)
        elif kind == "P":
            start = self.alloc(len(shape[1]))
            self.list_pointer(at, start, POINTER_LIST, len(shape[1]))
            for index, child in enumerate(shape[1]):
                self.pointer(start + index, child)
        elif kind == "C":
            data_words, pointer_words, structs = shape[1], shape[2], shape[3]
            stride = data_words + pointer_words
            start = self.alloc(1 + len(structs) * stride)
            self.list_pointer(at, start, COMPOSITE_LIST, len(structs) * stride)
            self.put(start, (len(structs) << 2) | data_words << 32 | pointer_words << 48)
            for index, element in enumerate(structs):
                first = start + 1 + index * stride
                data = bytes.fromhex(element[1]).ljust(data_words * 8, b"\0")[: data_words * 8]
                self.words[first * 8 : first * 8 + len(data)] = data
                for k, child in enumerate(element[2][:pointer_words]):
                    self.pointer(first + data_words + k, child)
        else:
            raise ValueError(f"unknown shape kind {kind!r}")


def write_message(message: Shape) -> bytes:
    """One-segment Cap'n Proto bytes for a ["M", root, sizes] shape (the sizes are recomputed)."""
    writer = _Writer()
    writer.pointer(0, message[1])
    return struct.pack("<II", 0, len(writer.words) // 8) + bytes(writer.words)
