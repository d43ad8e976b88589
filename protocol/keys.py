"""Wire rules for evaluation keys that the client and the server both apply."""

from __future__ import annotations

import hashlib
import re

KEY_ID_PATTERN = re.compile(r"[0-9a-f]{64}")  # always with fullmatch: `$` would let a trailing newline in


def key_id(key: bytes) -> str:
    """A key's id: the lowercase hex SHA-256 of its bytes (keys are content-addressed)."""
    return hashlib.sha256(key).hexdigest()


def parse_key_id(text: str) -> str | None:
    """The one parser of a key id that a client sent, on every route and adapter: the hex SHA-256 of the
    key, in either case (hex is case-insensitive), returned lowercase, the form keys are stored under.
    None for anything else: another length, a non-hex or non-ASCII character, surrounding white space."""
    lowered = text.lower()
    return lowered if text.isascii() and KEY_ID_PATTERN.fullmatch(lowered) else None


def is_key_id(text: str) -> bool:
    """Whether `text` is a key id exactly as stored (lowercase): names the server wrote itself (store
    entries, scopes). A client's id goes through `parse_key_id`."""
    return KEY_ID_PATTERN.fullmatch(text) is not None


def part_count(key_bytes: int, part_bytes: int) -> int:
    """How many parts a chunked upload of a key of `key_bytes` has, each at most `part_bytes` long."""
    return max(1, -(-key_bytes // part_bytes))
