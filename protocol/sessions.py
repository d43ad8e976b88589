"""SageMaker stateful sessions, used for key affinity: the headers and the container's answer.

A client asks for a session with `SessionId="NEW_SESSION"`; SageMaker forwards it to the container as
`X-Amzn-SageMaker-Session-Id: NEW_SESSION`. The container answers in the same header with
`<session id>; Expires=<UTC time>` and SageMaker hands that back as `NewSessionId`. Later requests that
carry the session id reach the same instance, where the client's evaluation key is warm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION = "NEW_SESSION"
# What sagemaker-runtime's InvokeEndpoint answers with the container's new session (boto3: NewSessionId).
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"

_EXPIRES = "%Y-%m-%dT%H:%M:%SZ"
_ANSWER = re.compile(r"(?P<id>[A-Za-z0-9._-]{1,256});\s*Expires=(?P<expires>\S+)")


@dataclass(frozen=True)
class Session:
    id: str
    expires: datetime

    def header(self) -> str:
        return f"{self.id}; Expires={self.expires.strftime(_EXPIRES)}"

    def expired(self, margin_seconds: float = 0.0) -> bool:
        return (self.expires - datetime.now(UTC)).total_seconds() <= margin_seconds


def parse_session(answer: str) -> Session:
    """The container's `<id>; Expires=<time>`; raises ValueError on anything else."""
    match = _ANSWER.fullmatch(answer.strip())
    if not match:
        raise ValueError("not a session answer: <id>; Expires=<UTC time>")
    expires = datetime.strptime(match["expires"], _EXPIRES).replace(tzinfo=UTC)
    return Session(match["id"], expires)
