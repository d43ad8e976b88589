"""Key upload in resumable parts, shared by every transport that has the part operations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fhe_bento.protocol import keys


class PartOps(Protocol):
    def put_whole_key(self, name: str, key: bytes) -> dict: ...

    def key_parts(self, name: str, key_id: str) -> list[int]: ...

    def put_key_part(self, name: str, key_id: str, index: int, data: bytes) -> None: ...

    def complete_key(self, name: str, key_id: str, count: int) -> dict: ...


def upload_key(
    ops: PartOps, name: str, key: bytes, part_bytes: int, on_progress: Callable[[int], None]
) -> dict:
    """Send a key whole if it fits one part, else in parts: ask which parts the server already holds (an
    earlier, interrupted upload, possibly to another replica), send the others, then complete."""
    if len(key) <= part_bytes:
        answer = ops.put_whole_key(name, key)
        on_progress(len(key))
        return answer
    key_id = keys.key_id(key)
    count = keys.part_count(len(key), part_bytes)
    held = set(ops.key_parts(name, key_id))
    for index in range(count):
        part = key[index * part_bytes : (index + 1) * part_bytes]
        if index not in held:
            ops.put_key_part(name, key_id, index, part)
        on_progress(len(part))
    return ops.complete_key(name, key_id, count)
