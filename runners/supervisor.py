"""The supervisor of a worker's FHE engine processes (`runners/engine_process.py`).

Each worker that holds a runner (`runners/runner.py`) supervises its own engine: `FHE_BENTO_ROW_THREADS`
child processes that hold the concrete-ml servers and the warm-key cache and evaluate one row at a time
each, taken in order from one queue. concrete parses in C++ with no hardening, so if a message that
`checks/payloads.py` let through still crashes an engine process:
- the worker survives, the row that process was computing gets 503 `runner_unavailable` (safe to retry:
  FHE is pure), rows in the other processes or still queued go on, and a new process starts at once;
  `ready()` is false until it has loaded its models; rows that arrive before a worker's engine is first
  ready wait for it instead (another worker may already answer `/ping`);
- a process that dies while idle is seen within `MONITOR_SECONDS` and replaced the same way;
- after `FHE_BENTO_ENGINE_MAX_FAILED_STARTS` starts in a row that die before they are ready
  (`RestartPolicy`), the worker gives up and stops the whole server (`runtime/lifecycle.py`), so that an
  orchestrator replaces it.
This works the same in the image, where BentoML does not respawn dead workers (`BENTOML_CONTAINERIZED`).

The supervisor is this module's own: one thread per engine process owns that process (its pipe,
`runners/engine_pipe.py`, and its `sentinel` to see it die) and hands it the next row only once it is free,
so the rows of a request that goes away are dropped unless they have started. pebble's ProcessPool was
tried: it sends every task to its workers' shared pipe at once and kills the worker of a task cancelled
after that, and it reports neither when a replacement worker has loaded nor a worker that dies starting
while another one is busy (it starts it again, silently), which `ready()` and the failed-start limit need.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fhe_bento.contract.errors import runner_unavailable
from fhe_bento.models.repository import ModelSpec
from fhe_bento.runners.engine_pipe import LOADED, Child, Forget, Row, RowResult
from fhe_bento.runners.engine_process import engine_main
from fhe_bento.runtime import metrics
from fhe_bento.runtime.settings import Settings

log = logging.getLogger("bentoml.fhe_bento.engine")
MONITOR_SECONDS = 0.5  # how soon a supervisor sees its process die while idle, or the engine stop
FIRST_LOAD_POLL = 0.1  # seconds between looks at a worker's first engine load, by the rows waiting for it


def _fail(future: Future[Any], message: Row | Forget, why: str) -> None:
    """The process could not answer `message`: a row gets 503; a forget is done, the cache went with it."""
    if isinstance(message, Forget):
        future.set_result(None)
    else:
        future.set_exception(runner_unavailable(why))


@dataclass
class RestartPolicy:
    """When a supervisor starts another engine process after one ended: always after a process that had
    loaded its models (a crash on a row); after one that died starting, only while fewer than
    `max_failed_starts` starts in a row have failed. One per supervisor thread."""

    max_failed_starts: int
    failed: int = 0  # starts in a row that died before they were ready

    def after_exit(self, loaded: bool) -> bool:
        """Record a process that ended (`loaded`: it had been ready); whether to start another."""
        self.failed = 0 if loaded else self.failed + 1
        return loaded or self.failed < self.max_failed_starts


class Engine:
    """The supervisor of one worker's engine processes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        specs: dict[str, ModelSpec],
        give_up: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.processes = settings.row_threads
        self.max_failed_starts = settings.engine_max_failed_starts
        self._give_up = give_up
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[tuple[Row, Future[RowResult]]] = deque()
        # keys this worker's engines have run rows with, so may hold warm (`forget_if_sent`)
        self._keys_sent: set[tuple[str, str]] = set()
        # per engine process: deleted keys to drop from its warm-key cache (`forget`)
        self._forgets: list[deque[tuple[Forget, Future[None]]]] = [deque() for _ in range(self.processes)]
        self._loaded = 0  # engine processes ready for rows
        self._started = threading.Event()  # set once the engine has been ready: its first load is done
        self._stopping = False
        self.restarts = 0
        self._supervisors = [
            threading.Thread(target=self._supervise, args=(i,), name=f"fhe-engine-{i}", daemon=True)
            for i in range(self.processes)
        ]
        for thread in self._supervisors:
            thread.start()
        # multiprocessing joins every child at exit, and engines ignore SIGTERM: they must be stopped first.
        atexit.register(self.shutdown)

    def ready(self) -> bool:
        return self._loaded == self.processes and not self._stopping

    # One thread per engine process: start it, wait for its models, hand it rows, and start another when it
    # dies, until the engine stops or gives up.

    def _supervise(self, index: int) -> None:
        restarts = RestartPolicy(self.max_failed_starts)
        while not self._stopping:
            loaded, exitcode = self._run_engine(index)
            if not self._died(loaded, exitcode, restarts):
                return

    def _run_engine(self, index: int) -> tuple[bool, int | None]:
        """One engine process, from its start to its end: whether it loaded its models, and its exit code."""
        try:
            engine = Child("fhe-engine", engine_main, os.getpid(), self.settings, self.specs)
        except Exception:  # the forkserver could not start it: a failed start too
            log.exception("FHE engine process could not be started")
            return False, None
        loaded = self._wait_loaded(engine)
        if loaded:
            self._count_loaded(+1)
            self._serve(engine, index)
            self._count_loaded(-1)
        engine.stop()  # dead already, unless the engine stops
        metrics.process_ended(engine.process.pid)  # its warm keys leave fhe_bento_key_cache_bytes
        self._settle_forgets(self._forgets[index])  # its cache is gone with it
        return loaded, engine.process.exitcode

    def _answered(self, engine: Child) -> bool:
        """Wait for the process's next message or death: False if the engine stops first."""
        while not self._stopping:
            if engine.answered(MONITOR_SECONDS):
                return True
        return False

    def _wait_loaded(self, engine: Child) -> bool:
        try:
            return self._answered(engine) and engine.receive() == LOADED
        except EOFError:
            return False

    def _count_loaded(self, change: int) -> None:
        with self._cond:
            self._loaded += change
            if change > 0 and self.ready():
                self._started.set()
                log.info("FHE engine ready: %d process(es)", self.processes)

    def _serve(self, engine: Child, index: int) -> None:
        while (item := self._next_message(engine, index)) is not None:
            message, future = item
            try:
                engine.conn.send(message)
                if not self._answered(engine):
                    _fail(future, message, "the FHE engine is stopping")
                    return
                ok, value = engine.receive_row()
            except (EOFError, OSError):  # OSError: it died before it read the row
                _fail(future, message, "the FHE engine process died while computing")
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _next_message(self, engine: Child, index: int) -> tuple[Row | Forget, Future[Any]] | None:
        """What the process does next: a deleted key to forget, first, else the next row not dropped;
        None once the process died while idle or the engine stops."""
        with self._cond:
            while not self._stopping and engine.idle_and_alive():  # a row goes to a live process only
                if self._forgets[index]:
                    return self._forgets[index].popleft()
                while self._queue:
                    row, future = self._queue.popleft()
                    if future.set_running_or_notify_cancel():  # from now on the row cannot be dropped
                        return row, future
                self._cond.wait(MONITOR_SECONDS)
        return None

    def _died(self, loaded: bool, exitcode: int | None, restarts: RestartPolicy) -> bool:
        """Count a process that ended; whether to start another (False: the engine stops, or gives up)."""
        with self._cond:
            if self._stopping:
                return False
            self.restarts += 1
            metrics.ENGINE_RESTARTS.inc()
            again = restarts.after_exit(loaded)
            if loaded:
                log.error(
                    "FHE engine process died (exit code %s): restarting it (restart %d)",
                    exitcode,
                    self.restarts,
                )
            else:
                log.error("FHE engine failed to start (exit code %s, %d in a row)", exitcode, restarts.failed)
            if again:
                return True
        self._stop()
        self._give_up(f"the FHE engine failed to start {restarts.failed} times in a row")
        return False

    def _stop(self) -> None:
        """No more rows: queued ones get 503, supervisors stop their processes."""
        with self._cond:
            self._stopping = True
            queued, self._queue = self._queue, deque()
            self._cond.notify_all()
        for forgets in self._forgets:
            self._settle_forgets(forgets)
        for _, future in queued:
            if future.set_running_or_notify_cancel():
                future.set_exception(runner_unavailable("the FHE engine is stopping"))

    def shutdown(self) -> None:
        """Stop the engine processes on purpose (a runner in a test process; a served runner's exit)."""
        self._stop()
        for thread in self._supervisors:
            if thread is not threading.current_thread():
                thread.join()

    async def run(
        self, model: str, scope: str, key_id: str | None, ciphertexts: list[bytes], deadline: float
    ) -> list[tuple[bytes, float]]:
        """Evaluate one request's checked rows in the engine: (result, FHE seconds) of each row that
        started, in order (a row whose deadline passed before it started has none). Cancelling this drops
        the rows not started."""
        rows: list[Row] = [(model, scope, key_id, ciphertext, deadline) for ciphertext in ciphertexts]
        futures: list[Future[RowResult]] = [Future() for _ in rows]
        await self._first_load(deadline)
        with self._cond:
            if key_id is not None:
                self._keys_sent.add((scope, key_id))
            if not self.ready():
                raise runner_unavailable(
                    "the FHE engine is restarting" if self._started.is_set() else "the FHE engine is starting"
                )
            self._queue.extend(zip(rows, futures, strict=True))
            self._cond.notify(len(rows))
        try:
            results = [await asyncio.wrap_future(future) for future in futures]
            return [result for result in results if result is not None]
        finally:
            dropped = sum(future.cancel() for future in futures)
            if dropped:
                with self._cond:  # their ciphertexts need not wait for their turn in the queue
                    self._queue = deque(item for item in self._queue if not item[1].cancelled())
                spec = self.specs[model]
                metrics.ROWS.labels(model=spec.name, version=spec.version, outcome="dropped").inc(dropped)
                log.info("%d rows of a cancelled request dropped before they started", dropped)

    async def forget(self, scope: str, key_id: str) -> None:
        """Drop a deleted key from every engine process's warm-key cache; returns once each has (a process
        computing a row does it after that row; one that dies or restarts has no cache left to clear)."""
        futures: list[Future[None]] = []
        with self._cond:
            self._keys_sent.discard((scope, key_id))
            if self._stopping:
                return
            for forgets in self._forgets:
                futures.append(Future())
                forgets.append((Forget(scope, key_id), futures[-1]))
            self._cond.notify_all()
        await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))

    async def forget_if_sent(self, scope: str, key_id: str) -> None:
        """`forget` a key found deleted, if this worker's engines may hold it warm: one deleted through
        another worker or replica leaves this worker's caches at its next request."""
        with self._cond:
            sent = (scope, key_id) in self._keys_sent
        if sent:
            await self.forget(scope, key_id)

    def _settle_forgets(self, forgets: deque[tuple[Forget, Future[None]]]) -> None:
        """Forgets a process will never do: its cache died with it (or the engine stops)."""
        with self._cond:
            pending = list(forgets)
            forgets.clear()
        for _, future in pending:
            future.set_result(None)

    async def _first_load(self, deadline: float) -> None:
        """Until this worker's engine has first been ready, its rows wait for it (until their deadline):
        `/ping` answered by another worker of the server may already call the server ready. Once it has
        been, rows during a restart get 503 at once (module docstring)."""
        while not self._started.is_set() and not self._stopping and time.time() < deadline:
            await asyncio.sleep(FIRST_LOAD_POLL)
