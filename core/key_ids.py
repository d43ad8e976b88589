"""The one refusal of a malformed key id, for every route and the runner alike."""

from __future__ import annotations

from fhe_bento.core.errors import FHEBentoError
from fhe_bento.protocol.keys import is_key_id


def check_key_id(key_id: str) -> str:
    if not is_key_id(key_id):
        raise FHEBentoError("invalid_key_id", "a key id is the 64-character lowercase hex SHA-256 of the key")
    return key_id
