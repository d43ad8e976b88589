"""Whether the FHE runner is up, asked by every `/ping`, and the watch that stops a server whose runner
stays down.

BentoML does not respawn a dead worker under BENTOML_CONTAINERIZED (so in every image), and an
orchestrator replaces a server that exits, not one that only fails its health checks: so once a runner
that answered before has not answered for `FHE_BENTO_RUNNER_DOWN_SECONDS`, the server stops with a
failure status (`runners/lifecycle.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import bentoml

from fhe_bento.runners.lifecycle import stop_server

READY_TIMEOUT = 0.5  # seconds; SageMaker gives /ping 2 s
WATCH_SECONDS = 5.0


class RunnerHealth:
    def __init__(self, runner: Any, down_seconds: float, stop_when_down: bool) -> None:
        self.runner = runner
        self.down_seconds = down_seconds
        self.stop_when_down = stop_when_down
        self._watch: asyncio.Future | None = None
        self._seen = False  # by any health check or watch: only a runner that answered can be down

    async def state(self) -> bool | None:
        """True when the runner's engine is up, False while it (re)starts, None when the runner itself does
        not answer. The runner answers at once (its API is async), even while every core computes."""
        # A call to a hung runner is abandoned, not awaited: BentoML's client does not give up on
        # cancellation, so `wait_for` would hang with it.
        call = asyncio.ensure_future(self.runner.to_async.ready())
        done, _ = await asyncio.wait({call}, timeout=READY_TIMEOUT)
        if not done:
            call.cancel()
            return None
        try:
            state = bool(call.result())
        except Exception:  # runner starting or gone: connection refused, ...
            return None
        self._seen = True
        return state

    async def is_ready(self) -> bool:
        """Asked on every /ping, so a dead or restarting engine turns /ping to 503 at its next check."""
        if self._watch is None and self.stop_when_down:  # started here, on the serving event loop, by the first health check
            self._watch = asyncio.ensure_future(self._watch_runner())
        return bool(await self.state())

    async def _watch_runner(self) -> None:
        down_since = None
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            if await self.state() is not None:
                down_since = None
            elif self._seen:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.down_seconds:
                    stop_server(f"the FHE runner has not answered for {self.down_seconds} s", kill_runners=True)
                    return


def current_health() -> RunnerHealth:
    """The serving service's runner health: a FastAPI dependency, which in-process tests override."""
    return bentoml.get_current_service().health
