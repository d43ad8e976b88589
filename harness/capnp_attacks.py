"""Attack tooling for the hostile-input tests and bench: rewrite real ciphertexts and keys the way an
attacker would, at the Cap'n Proto level.

`write_message` writes a message (one segment) from a shape read with `read_shape(..., keep_blobs=True)`;
`mutate` applies one attack family to a real message. Both tests (hypothesis draws the choices) and
`bench/hostile.py` (a seeded random draws them) use the same families. `layout_refusal` says which of the
documented layout checks a message trips, so that a test knows the one answer a route owes it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

from fhe_bento.checks.capnp_wire import (
    COMPOSITE_LIST,
    POINTER_LIST,
    MalformedMessage,
    Shape,
    first_difference,
    read_shape,
)
from fhe_bento.models.repository import ModelSpec

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


def unfar(node: Shape) -> Shape:
    return node[1] if node and node[0] == "F" else node


def payloads(shape: Shape) -> list[list]:
    """Every Payload.data list (a pointer list of blobs) in a shape read with keep_blobs."""
    found = []

    def walk(node) -> None:
        if isinstance(node, list):
            if node and node[0] == "P" and node[1] and all(unfar(b) and unfar(b)[0] == "B" for b in node[1]):
                found.append(node)
            for child in node:
                walk(child)

    walk(shape)
    return found


def split_blobs(data: bytes, parts: int, which: int = 0) -> bytes:
    """The attack of issue 10: one payload's blob split into `parts` blobs of the same total size."""
    shape = read_shape(data, keep_blobs=True)
    payload = payloads(shape)[which]
    _, size, content = unfar(payload[1][0])
    cuts = [size * i // parts for i in range(parts + 1)]
    payload[1] = [["B", b - a, content[a:b]] for a, b in itertools.pairwise(cuts)]
    return write_message(shape)


def resize_blob(data: bytes, which: int, delta: int) -> bytes:
    """One payload's blob made `delta` bytes longer or shorter."""
    shape = read_shape(data, keep_blobs=True)
    payload = payloads(shape)[which]
    _, size, content = unfar(payload[1][0])
    payload[1] = [["B", size + delta, content[: size + delta].ljust(size + delta, b"\1")]]
    return write_message(shape)


def structural_words(data: bytes) -> list[int]:
    """Byte offsets of the words of a message that are not blob content: segment table, pointers, data."""
    count = struct.unpack_from("<I", data, 0)[0] + 1
    header = 4 + 4 * count + (-(4 + 4 * count) % 8)
    blob_ranges = []
    for payload in payloads(read_shape(data, keep_blobs=True)):
        for blob in payload[1]:
            content = unfar(blob)[2]
            start = data.find(content)
            blob_ranges.append((start, start + len(content)))
    return list(range(0, header, 8)) + [
        offset for offset in range(header, len(data), 8) if not any(a <= offset < b for a, b in blob_ranges)
    ]


FAMILIES = (
    "pointer word",
    "bit flip",
    "truncation",
    "segment table",
    "blob split",
    "blob size",
    "blob content",
)


def mutate(data: bytes, family: str, draw: Callable[[int, int], int]) -> bytes:
    """`data` with one attack of `family` applied; `draw(lo, hi)` picks each choice (inclusive bounds).
    Only "blob content" leaves the message's shape as it was."""
    raw = bytearray(data)
    if family in ("pointer word", "bit flip"):
        words = structural_words(data)
        offset = words[draw(0, len(words) - 1)]
        old = struct.unpack_from("<Q", raw, offset)[0]
        new = draw(0, 2**64 - 1) if family == "pointer word" else old ^ (1 << draw(0, 63))
        struct.pack_into("<Q", raw, offset, new if new != old else old ^ 1)
    elif family == "truncation":
        del raw[draw(0, len(raw) - 1) :]
    elif family == "segment table":
        raw[draw(0, 7)] ^= 1 << draw(0, 7)
    elif family == "blob split":
        return split_blobs(data, draw(2, 5), draw(0, len(payloads(read_shape(data))) - 1))
    elif family == "blob size":
        delta = (-16, -8, -7, -1, 1, 7, 8, 16)[draw(0, 7)]
        return resize_blob(data, draw(0, len(payloads(read_shape(data))) - 1), delta)
    elif family == "blob content":
        blob_start = data.find(unfar(payloads(read_shape(data, keep_blobs=True))[0][1][0])[2])
        raw[blob_start + draw(0, 15)] ^= 0xFF
    else:
        raise ValueError(f"unknown attack family {family!r}")
    return bytes(raw)


def layout_refusal(spec: ModelSpec, data: bytes, what: str) -> tuple[int, str] | None:
    """The answer that the layout check of a ciphertext or evaluation key (`what`: "ciphertext" or "key")
    owes `data` for the model `spec`, in the documented order (docs/http-api.md's error table, docs/security.md
    "Untrusted bytes"): 400 `invalid_<what>` when the strict reader refuses it as Cap'n Proto, else 422
    `<what>_mismatch` when its size (checked first) or its shape is not the model's; None when it passes,
    as a message that differs from the model's only in the contents of its payload blobs does."""
    meta = spec.meta
    size, shape = (
        (meta.eval_key_bytes, meta.key_shape)
        if what == "key"
        else (meta.ciphertext_bytes, meta.ciphertext_shape)
    )
    try:
        got = read_shape(data)
    except MalformedMessage:
        return 400, f"invalid_{what}"
    if len(data) != size or first_difference(got, shape) is not None:
        return 422, f"{what}_mismatch"
    return None
