"""Wire rules for evaluation keys that the client and the server both apply."""

from __future__ import annotations

import hashlib
import re

KEY_ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def key_id(key: bytes) -> str:
    """A key's id: the lowercase hex SHA-256 of its bytes (keys are content-addressed)."""
    return hashlib.sha256(key).hexdigest()


def is_key_id(text: str) -> bool:
    return KEY_ID_PATTERN.match(text) is not None


def part_count(key_bytes: int, part_bytes: int) -> int:
    """How many parts a chunked upload of a key of `key_bytes` has, each at most `part_bytes` long."""
    return max(1, -(-key_bytes // part_bytes))
