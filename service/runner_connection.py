"""The HTTP service's connections to its FHE runner: idle ones are dropped before the runner drops them.

The runner's uvicorn closes a connection idle for 5 s (its default keep-alive), while the aiohttp pool of
BentoML's runner client keeps one for 15 s. A call sent on a connection just as the runner closed it fails
with ServerDisconnectedError: after a burst, dozens of pooled connections reach the 5 s mark together.
BentoML has no setting for its client's keep-alive, so this sets the pool's own (aiohttp's
`keepalive_timeout`, read whenever a pooled connection is taken) on every session BentoML makes.
"""

from __future__ import annotations

from typing import Any

CLIENT_KEEPALIVE_SECONDS = 2.0  # well under the runner's 5 s


def drop_idle_connections_first(runner: Any) -> None:
    """`runner`: the `bentoml.depends` proxy of the FHE runner."""
    sessions = runner.to_async._session_manager
    make_session = sessions._make_client

    def make_session_with_short_keepalive() -> Any:
        session = make_session()
        if session.connector is not None:
            session.connector._keepalive_timeout = CLIENT_KEEPALIVE_SECONDS
        return session

    sessions._make_client = make_session_with_short_keepalive
