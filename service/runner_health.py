"""Whether the FHE runner is up: asked by every `/ping` and by every runner call, and the watch that stops
a server whose runner stays down.

The signal is one that a saturated runner still gives and a dead one stops giving at once: the runner's
heartbeat files (`core/heartbeat.py`), or, for a runner served elsewhere, its `/readyz` on a connection
of its own. Never a call queued behind requests: under a burst, `/ping` stays 200 while the runner is busy.

BentoML does not respawn a dead worker under BENTOML_CONTAINERIZED (so in every image), and an
orchestrator replaces a server that exits, not one that only fails its health checks: so once a runner
that was up has been down for `FHE_BENTO_RUNNER_DOWN_SECONDS`, the server stops with a failure status
(`core/lifecycle.py`). The watch reads the same signal as `/ping`, so a burst cannot stop a healthy server.
While the runner is down, every runner call, in flight or new, fails at once with 503 `runner_unavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import bentoml
import httpx

from fhe_bento.core.heartbeat import runner_state
from fhe_bento.core.lifecycle import stop_server

Probe = Callable[[], Awaitable[bool | None]]
READYZ_TIMEOUT = 0.5  # seconds; SageMaker gives /ping 2 s
WATCH_SECONDS = 0.25


def heartbeat_probe(expected_workers: int) -> Probe:
    """The co-located runner's state from its heartbeat files."""

    async def probe() -> bool | None:
        return runner_state(expected_workers)

    return probe


def readyz_probe(runner_url: str) -> Probe:
    """A runner served elsewhere: its BentoML `/readyz` (200 once its engine is ready), on a client of its
    own, so the probe never waits behind the service's runner calls."""
    client = httpx.AsyncClient(base_url=runner_url, timeout=READYZ_TIMEOUT)

    async def probe() -> bool | None:
        try:
            return (await client.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return None

    return probe


class RunnerHealth:
    def __init__(self, probe: Probe, down_seconds: float, stop_when_down: bool) -> None:
        self.probe = probe
        self.down_seconds = down_seconds
        self.stop_when_down = stop_when_down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Future | None = None
        self._down: asyncio.Event | None = None  # set while a runner that was up is down
        self._seen = False  # only a runner that was up can be down

    def _start_watch(self) -> None:
        """The watch runs on the serving event loop, started there by the first health check or call: one
        loop in a server (an in-process test client may open one per request, and gets a watch on each)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._down = asyncio.Event()
            self._watch = asyncio.ensure_future(self._watch_runner())

    async def is_ready(self) -> bool:
        self._start_watch()
        return bool(await self.probe())

    def is_down(self) -> bool:
        self._start_watch()
        return self._down is not None and self._down.is_set()

    async def wait_down(self) -> None:
        """Returns once the runner is seen down (used to fail calls in flight at once)."""
        self._start_watch()
        assert self._down is not None
        await self._down.wait()

    async def _watch_runner(self) -> None:
        assert self._down is not None
        down_since = None
        while True:
            if await self.probe() is not None:
                self._seen = True
                self._down.clear()
                down_since = None
            elif self._seen:
                self._down.set()
                down_since = down_since or time.monotonic()
                if self.stop_when_down and time.monotonic() - down_since > self.down_seconds:
                    stop_server(
                        f"the FHE runner has not answered for {self.down_seconds} s", kill_runners=True
                    )
                    return
            await asyncio.sleep(WATCH_SECONDS)


def current_health() -> RunnerHealth:
    """The serving service's runner health: a FastAPI dependency, which in-process tests override."""
    return bentoml.get_current_service().health
