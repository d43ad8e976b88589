"""The checks of a key's id and size, for every route and the runner alike."""

from __future__ import annotations

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol.keys import parse_key_id


def check_key_id(key_id: str) -> str:
    """A client's key id, lowercased (`protocol.keys.parse_key_id`), or 400 `invalid_key_id`."""
    parsed = parse_key_id(key_id)
    if parsed is None:
        raise FHEBentoError("invalid_key_id", "a key id is the 64-character hex SHA-256 of the key")
    return parsed


def check_key_size(size: int, limit: int) -> None:
    """Refuse a key (whole, inline in an envelope, or its parts added up) longer than `limit`."""
    if size > limit:
        raise FHEBentoError("payload_too_large", f"a key is at most {limit} bytes (FHE_BENTO_MAX_KEY_BYTES)")
