"""The container's side of SageMaker stateful sessions (key affinity, docs/sagemaker.md "Key affinity").

A session is tied to one evaluation key and ends at a fixed time. Its id says both, so that every HTTP
worker of the instance, and the instance after a restart, checks it without shared state:
`<first 16 hex digits of the key id>.<expiry, Unix seconds>.<random>`. The id routes; it grants nothing
(the bearer token does), so it needs no signature.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol.sessions import NEW_SESSION, Session
from fhe_bento.runtime.metrics import SESSIONS

_KEY_PREFIX = 16
_SESSION_ID = re.compile(r"(?P<key>[0-9a-f]{16})\.(?P<expires>[0-9]{1,12})\.[0-9a-f]{16}")


def _invalid(message: str) -> FHEBentoError:
    SESSIONS.labels(outcome="invalid").inc()
    return FHEBentoError("invalid_session", f"{message}; open a new session (SessionId=NEW_SESSION)")


def session_for(requested: str | None, key_id: str | None, lifetime_seconds: int) -> Session | None:
    """The session to answer with: a new one for `NEW_SESSION`, None otherwise (after checking that the
    requested session is this key's and has not ended). With sessions off (lifetime 0), NEW_SESSION is
    served without one, so that SageMaker routes the client at random."""
    if not requested:
        return None
    if key_id is None:
        raise _invalid("a session is tied to an evaluation key; this request names none")
    if requested == NEW_SESSION:
        if lifetime_seconds == 0:
            return None
        expires = int(time.time()) + lifetime_seconds
        SESSIONS.labels(outcome="opened").inc()
        return Session(
            f"{key_id[:_KEY_PREFIX]}.{expires}.{secrets.token_hex(8)}",
            datetime.fromtimestamp(expires, UTC),
        )
    match = _SESSION_ID.fullmatch(requested)
    if not match:
        raise _invalid("unknown session id")
    if match["key"] != key_id[:_KEY_PREFIX]:
        raise _invalid("this session belongs to another evaluation key")
    if int(match["expires"]) <= time.time():
        raise _invalid("this session has ended")
    return None
