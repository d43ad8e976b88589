"""FHE engine processes: the only processes in which client bytes reach concrete.

Each worker that holds a runner (`runners/runner.py`) supervises its own engine: `FHE_BENTO_ROW_THREADS`
child processes that hold the concrete-ml servers and the warm-key cache and evaluate one row at a time
each, taken in order from one queue. concrete parses in C++ with no hardening, so if a message that
`core/payload_check.py` let through still crashes an engine process:
- the worker survives, the row that process was computing gets 503 `runner_unavailable` (safe to retry:
  FHE is pure), rows in the other processes or still queued go on, and a new process starts at once;
  `ready()` is false until it has loaded its models; rows that arrive before a worker's engine is first
  ready wait for it instead (another worker may already answer `/ping`);
- a process that dies while idle is seen within `MONITOR_SECONDS` and replaced the same way;
- after `FHE_BENTO_ENGINE_MAX_FAILED_STARTS` starts in a row that die before they are ready, the worker
  gives up and stops the whole server (`core/lifecycle.py`), so that an orchestrator replaces it.
This works the same in the image, where BentoML does not respawn dead workers (`BENTOML_CONTAINERIZED`).

The supervisor is this module's own: one thread per engine process owns that process (a pipe to it, and
its `sentinel` to see it die) and hands it the next row only once it is free, so the rows of a request
that goes away are dropped unless they have started. pebble's ProcessPool was tried: it sends every task
to its workers' shared pipe at once and kills the worker of a task cancelled after that, and it reports
neither when a replacement worker has loaded nor a worker that dies starting while another one is busy
(it starts it again, silently), which `ready()` and the failed-start limit need.

Uploaded keys are deserialized once more in a throwaway process (`verify_key`) before they are stored.
Children fork from a forkserver that has imported concrete, so a restart or a verification does not pay
the 3 s import again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from fhe_bento.core import metrics
from fhe_bento.core.errors import FHEBentoError
from fhe_bento.core.model_repo import ModelSpec
from fhe_bento.core.settings import Settings
from fhe_bento.runners.key_cache import KeyCache
from fhe_bento.runners.key_registry import KeyRegistry
from fhe_bento.runners.key_store_url import open_store
from fhe_bento.runners.memory_plan import plan_memory
from fhe_bento.runners.verify_slots import VerifySlots

log = logging.getLogger("bentoml.fhe_bento.engine")
MONITOR_SECONDS = 0.5  # how soon a supervisor sees its process die while idle, or the engine stop
STOP_GRACE = 1.0  # seconds a stopped process has to exit on its own before it is killed
RESTART_RETRY_AFTER = 10  # seconds a client is told to wait while an engine restarts
PIPE_BUFFER_BYTES = 4 << 20  # socket buffers of the pipe to each child (`_widen`)
FIRST_LOAD_POLL = 0.1  # seconds between looks at a worker's first engine load, by the rows waiting for it
_LOADED = "loaded"  # an engine process's first message

Row = tuple[str, str, str | None, bytes, float]  # the arguments of `_run_row` after the state
RowResult = tuple[bytes, float] | None


def _fhe() -> Any:
    from concrete import fhe

    return fhe


# --- inside an engine process ----------------------------------------------------------------------


class _LoadedModel:
    def __init__(self, spec: ModelSpec) -> None:
        from concrete.ml.deployment import FHEModelServer

        self.spec = spec
        self.server = FHEModelServer(str(spec.path))
        self.builtin_key = (
            _fhe().EvaluationKeys.deserialize(bytes.fromhex(spec.meta.builtin_key))
            if spec.meta.builtin_key
            else None
        )


class _EngineState:
    def __init__(self, settings: Settings, specs: dict[str, ModelSpec]) -> None:
        self.models = {name: _LoadedModel(spec) for name, spec in specs.items()}
        self.keys = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.cache = KeyCache(plan_memory(settings, specs).key_cache_bytes)

    def evaluation_key(self, model: _LoadedModel, scope: str, key_id: str | None) -> Any:
        """The row's key: built in, or the one its request was checked for (`KeyService.usable`), warm
        in the cache or read from the store. A cached copy of a key deleted since is never used: the
        runner checks every request's key before its rows get here."""
        if model.builtin_key is not None:
            return model.builtin_key
        assert key_id is not None, "a model that needs a key gets its rows with a checked key id"

        def load() -> tuple[Any, int]:
            if not self.keys.has(scope, key_id):  # deleted or expired since its request was checked
                raise FHEBentoError(
                    "unknown_key", f"key {key_id} is not registered for model {model.spec.name!r}"
                )
            # Stored keys passed payload_check and the throwaway verification when they were uploaded.
            return _fhe().EvaluationKeys.deserialize(
                self.keys.read(scope, key_id)
            ), model.spec.meta.warm_key_bytes

        key, hit = self.cache.get_or_load((scope, key_id), load)
        if not hit:
            _return_freed_memory()  # keys the load evicted
        metrics.KEY_CACHE.labels(model=model.spec.name, result="hit" if hit else "miss").inc()
        return key


def _exit_with(supervisor: int) -> None:
    # An engine's parent is the forkserver, which outlives a killed worker as long as an engine holds
    # its pipe: so each engine watches its supervisor and exits with it.
    with contextlib.suppress(ProcessLookupError):
        select.select([os.pidfd_open(supervisor)], [], [])
    os._exit(0)


def _limit_openmp(threads: int) -> None:
    # concrete's OpenMP runtime already read OMP_NUM_THREADS (unset) when the forkserver imported concrete.ml:
    # the variable is for runtimes started later, the call sets the loaded ones (for this thread, which
    # evaluates the rows). threadpoolctl comes with scikit-learn, which concrete-ml requires.
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = str(threads)
    threadpool_limits(threads, user_api="openmp")


def _start_engine(supervisor: int, settings: Settings, specs: dict[str, ModelSpec]) -> _EngineState:
    # A server that stops signals the whole process tree; an engine that died of it first would look like
    # a crash to its supervisor. Engines stop only with their supervisor.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(supervisor,), name="fhe-engine-supervisor", daemon=True).start()
    _limit_openmp(settings.omp_threads_per_row())
    return _EngineState(settings, specs)


def _return_freed_memory() -> None:
    """Give the memory of evicted keys back to the system: the cache bound is a bound on resident memory.
    (malloc's default placement is kept: forcing every block over 1 MB to come from mmap instead made each
    row's large buffers fault in fresh pages, a third more CPU on a hybrid model's layer.)"""
    ctypes.CDLL(None).malloc_trim(0)


def _classify_run_error(exc: Exception) -> FHEBentoError:
    if "incompatible" in str(exc):  # type info or variance of another circuit
        return FHEBentoError("ciphertext_mismatch", "the ciphertext was not made for this model")
    return FHEBentoError("invalid_ciphertext", "the ciphertext could not be deserialized")


def _run_row(
    state: _EngineState, model: str, scope: str, key_id: str | None, ciphertext: bytes, deadline: float
) -> RowResult:
    """One row, in an engine process: its result and FHE seconds, or None when its request's deadline
    passed before it started."""
    if time.time() > deadline:
        metrics.ROWS.labels(model=model, outcome="dropped").inc()
        return None
    loaded = state.models[model]
    key = state.evaluation_key(loaded, scope, key_id)
    started = time.perf_counter()
    try:
        result = loaded.server.run(ciphertext, key)
    except (RuntimeError, ValueError, AssertionError) as exc:
        metrics.ROWS.labels(model=model, outcome="error").inc()
        raise _classify_run_error(exc) from None
    seconds = time.perf_counter() - started
    metrics.FHE_RUN_SECONDS.labels(model=model).observe(seconds)
    metrics.ROWS.labels(model=model, outcome="ok").inc()
    return result, seconds


def _deserialize_key(path: str) -> int:
    """In a throwaway process: deserialize a stored upload as concrete will; returns its size."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        _fhe().EvaluationKeys.deserialize(data)
    except RuntimeError:
        raise FHEBentoError("invalid_key", "the body is not a serialized concrete evaluation key") from None
    return len(data)


def _outcome(function: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """(True, what `function` returns) or (False, what it raises), to send back to the supervisor."""
    try:
        return True, function(*args)
    except Exception as exc:
        return False, exc


def _engine_main(conn: Connection, supervisor: int, settings: Settings, specs: dict[str, ModelSpec]) -> None:
    """An engine process: load the models (`specs`, checked by its supervisor's process), say so, then
    evaluate the rows its supervisor sends, one at a time, until it sends None or goes away. A start that
    raises ends the process before it is loaded."""
    state = _start_engine(supervisor, settings, specs)
    conn.send(_LOADED)
    with contextlib.suppress(EOFError):
        while (row := conn.recv()) is not None:
            ok, value = _outcome(_run_row, state, *row)
            if ok and value is not None:
                # A result's bytes follow its FHE seconds as a raw message: pickling them cost a copy each
                # way, and a hybrid model's layer answers megabytes (`_Child.receive_row`).
                result, seconds = value
                conn.send((True, seconds))
                conn.send_bytes(result)
            else:
                conn.send((ok, value))


def _verify_main(conn: Connection, path: str) -> None:
    conn.send(_outcome(_deserialize_key, path))


# --- in the worker: the supervisor -------------------------------------------------------------------


def _context() -> multiprocessing.context.ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "concrete.fhe",
            "concrete.ml.deployment",
            "fhe_bento.runners.engine",
            "fhe_bento.runners.forkserver_signals",
        ]
    )  # last: concrete installs handlers
    return context


def _unavailable(reason: str) -> FHEBentoError:
    return FHEBentoError(
        "runner_unavailable",
        f"the FHE engine {reason}; retry",
        headers={"Retry-After": str(RESTART_RETRY_AFTER)},
    )


def _widen(conn: Connection) -> None:
    """Give one end of a pipe to a child (a Unix socket pair) buffers of PIPE_BUFFER_BYTES, so that a
    result of megabytes crosses in a few reads instead of one wake-up per default buffer (about 200 KB):
    on a hybrid model's 2 MB layer result that was a third of the worker's CPU per call. The kernel caps
    the sizes at net.core.wmem_max / rmem_max; memory is used only while bytes are in flight."""
    sock = socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)  # a duplicate of the fd
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BUFFER_BYTES)
    finally:
        sock.close()


class _Child:
    """A child process forked by the forkserver, and the supervisor's end of a pipe to it. Used by one
    thread at a time: it alone waits for the process and reaps it."""

    def __init__(self, name: str, main: Callable[..., None], *args: Any) -> None:
        context = _context()
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=main, args=(child_end, *args), name=name)
        self.process.start()
        for end in (self.conn, child_end):
            _widen(end)
        child_end.close()  # the child's is the only one left: its death reads as EOF here
        # One poll set for the process's life: its pipe (a message, or EOF once it is gone) and its sentinel.
        # multiprocessing's `wait` builds a selector on every call, and `is_alive` another: on a cheap
        # circuit's row, that was a measurable share of the supervisor's CPU.
        self._events = select.poll()
        for fd in (self.conn.fileno(), self.process.sentinel):
            self._events.register(fd, select.POLLIN)

    def answered(self, timeout: float | None = None) -> bool:
        """Whether a message or the child's death came within `timeout`."""
        return bool(self._events.poll(None if timeout is None else 1000 * timeout))

    def idle_and_alive(self) -> bool:
        """For a child that owes no answer: whether it is still alive. Such a child writes nothing, so
        anything to read on its pipe or sentinel means it has died."""
        return not self.answered(0)

    def receive(self) -> Any:
        """The child's next message, once `answered`; EOFError if it died first."""
        try:
            if self.conn.poll():  # readable: a message, or EOF once the child is gone
                return self.conn.recv()
        except OSError:
            pass
        raise EOFError

    def receive_row(self) -> tuple[bool, Any]:
        """An engine's answer to a row, once `answered`: (True, (result, FHE seconds)), (True, None) for a
        row dropped at its deadline, or (False, the error); EOFError (or OSError) if it died first."""
        ok, value = self.receive()
        if ok and value is not None:
            return True, (self.conn.recv_bytes(), value)
        return ok, value

    def stop(self) -> None:
        """End the child on purpose: an idle engine exits when told; any other is killed after STOP_GRACE."""
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(STOP_GRACE)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        self.conn.close()


class Engine:
    """The supervisor of one worker's engine processes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        specs: dict[str, ModelSpec],
        give_up: Callable[[str], None],
        verify_slots: VerifySlots,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.processes = settings.row_threads
        self.max_failed_starts = settings.engine_max_failed_starts
        self.verify_slots = verify_slots
        self._give_up = give_up
        self._cond = threading.Condition()  # guards everything below
        self._queue: deque[tuple[Row, Future[RowResult]]] = deque()
        self._loaded = 0  # engine processes ready for rows
        self._started = threading.Event()  # set once the engine has been ready: its first load is done
        self._stopping = False
        self.restarts = 0
        self._supervisors = [
            threading.Thread(target=self._supervise, name=f"fhe-engine-{i}", daemon=True)
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

    def _supervise(self) -> None:
        failed = 0  # starts in a row of this thread's process that died before they were ready
        while not self._stopping:
            loaded, exitcode = self._run_engine()
            failed = 0 if loaded else failed + 1
            if not self._died(loaded, exitcode, failed):
                return

    def _run_engine(self) -> tuple[bool, int | None]:
        """One engine process, from its start to its end: whether it loaded its models, and its exit code."""
        try:
            engine = _Child("fhe-engine", _engine_main, os.getpid(), self.settings, self.specs)
        except Exception:  # the forkserver could not start it: a failed start too
            log.exception("FHE engine process could not be started")
            return False, None
        loaded = self._wait_loaded(engine)
        if loaded:
            self._count_loaded(+1)
            self._serve(engine)
            self._count_loaded(-1)
        engine.stop()  # dead already, unless the engine stops
        return loaded, engine.process.exitcode

    def _answered(self, engine: _Child) -> bool:
        """Wait for the process's next message or death: False if the engine stops first."""
        while not self._stopping:
            if engine.answered(MONITOR_SECONDS):
                return True
        return False

    def _wait_loaded(self, engine: _Child) -> bool:
        try:
            return self._answered(engine) and engine.receive() == _LOADED
        except EOFError:
            return False

    def _count_loaded(self, change: int) -> None:
        with self._cond:
            self._loaded += change
            if change > 0 and self.ready():
                self._started.set()
                log.info("FHE engine ready: %d process(es)", self.processes)

    def _serve(self, engine: _Child) -> None:
        while (item := self._next_row(engine)) is not None:
            row, future = item
            try:
                engine.conn.send(row)
                if not self._answered(engine):
                    future.set_exception(_unavailable("is stopping"))
                    return
                ok, value = engine.receive_row()
            except (EOFError, OSError):  # OSError: it died before it read the row
                future.set_exception(_unavailable("process died while computing"))
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def _next_row(self, engine: _Child) -> tuple[Row, Future[RowResult]] | None:
        """The next row not dropped, or None once the process died while idle or the engine stops."""
        with self._cond:
            while not self._stopping and engine.idle_and_alive():  # a row goes to a live process only
                while self._queue:
                    row, future = self._queue.popleft()
                    if future.set_running_or_notify_cancel():  # from now on the row cannot be dropped
                        return row, future
                self._cond.wait(MONITOR_SECONDS)
        return None

    def _died(self, loaded: bool, exitcode: int | None, failed: int) -> bool:
        """Count a process that ended (`failed`: its starts in a row that died before they were ready);
        whether to start another (False: the engine stops, or gives up)."""
        with self._cond:
            if self._stopping:
                return False
            self.restarts += 1
            metrics.ENGINE_RESTARTS.inc()
            if loaded:
                log.error(
                    "FHE engine process died (exit code %s): restarting it (restart %d)",
                    exitcode,
                    self.restarts,
                )
                return True
            log.error("FHE engine failed to start (exit code %s, %d in a row)", exitcode, failed)
            if failed < self.max_failed_starts:
                return True
        self._stop()
        self._give_up(f"the FHE engine failed to start {failed} times in a row")
        return False

    def _stop(self) -> None:
        """No more rows: queued ones get 503, supervisors stop their processes."""
        with self._cond:
            self._stopping = True
            queued, self._queue = self._queue, deque()
            self._cond.notify_all()
        for _, future in queued:
            if future.set_running_or_notify_cancel():
                future.set_exception(_unavailable("is stopping"))

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
            if not self.ready():
                raise _unavailable("is restarting" if self._started.is_set() else "is starting")
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
                metrics.ROWS.labels(model=model, outcome="dropped").inc(dropped)
                log.info("%d rows of a cancelled request dropped before they started", dropped)

    async def _first_load(self, deadline: float) -> None:
        """Until this worker's engine has first been ready, its rows wait for it (until their deadline):
        `/ping` answered by another worker of the server may already call the server ready. Once it has
        been, rows during a restart get 503 at once (module docstring)."""
        while not self._started.is_set() and not self._stopping and time.time() < deadline:
            await asyncio.sleep(FIRST_LOAD_POLL)

    async def verify_key(self, path: str) -> int:
        """Deserialize an upload in a throwaway process, once a verification slot is free (`verify_slots`);
        400 invalid_key if that process dies on it."""
        async with self.verify_slots.slot():
            verifier = await asyncio.to_thread(_Child, "fhe-key-verifier", _verify_main, path)
            try:
                await asyncio.to_thread(verifier.answered)
                ok, value = verifier.receive()
            except EOFError:
                log.warning("the key verifier died on an upload: refused")
                raise FHEBentoError(
                    "invalid_key", "the body is not a serialized concrete evaluation key"
                ) from None
            finally:
                # Its memory is back before the slot is free for the next one (waited for off the event loop).
                await asyncio.to_thread(verifier.stop)
            if not ok:
                raise value
            return int(value)
