"""FHE engine processes: the only processes in which client bytes reach concrete.

Each runner worker supervises its own engine: a `ProcessPoolExecutor` of `FHE_BENTO_ROW_THREADS` child
processes that hold the concrete-ml servers and the warm-key cache and evaluate one row at a time each.
concrete parses in C++ with no hardening, so if a message that `core/payload_check.py` let through
still crashes an engine process:
- the worker survives, every row in flight gets 503 `runner_unavailable` (safe to retry: FHE is pure),
  and the worker starts a new engine at once; `ready()` is false until it has loaded its models;
- an engine that dies while idle is seen within `MONITOR_SECONDS` and restarted the same way;
- after `FHE_BENTO_ENGINE_MAX_FAILED_STARTS` starts in a row that die before they are ready, the worker
  gives up and stops the whole server (`core/lifecycle.py`), so that an orchestrator replaces it.
This works the same in the image, where BentoML does not respawn dead workers (`BENTOML_CONTAINERIZED`).

Uploaded keys are deserialized once more in a throwaway process (`verify_key`) before they are stored.
Children fork from a forkserver that has imported concrete, so a restart or a verification does not pay
the 3 s import again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fhe_bento.core import metrics
from fhe_bento.core.errors import FHEBentoError
from fhe_bento.core.model_repo import ModelSpec, load_specs
from fhe_bento.core.settings import get_settings
from fhe_bento.runners.key_cache import KeyCache
from fhe_bento.runners.key_registry import KeyRegistry
from fhe_bento.runners.key_store_url import open_store
from fhe_bento.runners.memory_plan import plan_memory
from fhe_bento.runners.verify_slots import VerifySlots

log = logging.getLogger("bentoml.fhe_bento.engine")
MONITOR_SECONDS = 0.5
RESTART_RETRY_AFTER = 10  # seconds a client is told to wait while an engine restarts
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _fhe():
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
    def __init__(self) -> None:
        settings = get_settings()
        specs = load_specs(settings)
        self.models = {name: _LoadedModel(spec) for name, spec in specs.items()}
        self.keys = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.cache = KeyCache(plan_memory(settings, specs).key_cache_bytes)

    def evaluation_key(self, model: _LoadedModel, scope: str, key_id: str | None) -> Any:
        if model.builtin_key is not None:
            return model.builtin_key
        if not key_id:
            raise FHEBentoError("missing_key_id", "this model needs an evaluation key: send its key id")
        if not self.keys.has(scope, key_id):
            self.cache.discard((scope, key_id))  # deleted or expired: a cached copy must not outlive it
            raise FHEBentoError(
                "unknown_key", f"key {key_id} is not registered for model {model.spec.name!r}"
            )

        def load() -> tuple[Any, int]:
            # Stored keys passed payload_check and the throwaway verification when they were uploaded.
            return _fhe().EvaluationKeys.deserialize(
                self.keys.read(scope, key_id)
            ), model.spec.meta.warm_key_bytes

        key, hit = self.cache.get_or_load((scope, key_id), load)
        if not hit:
            _return_freed_memory()  # keys the load evicted
        self.keys.mark_used(scope, key_id)
        metrics.KEY_CACHE.labels(model=model.spec.name, result="hit" if hit else "miss").inc()
        return key


_state: _EngineState | None = None


def _exit_with(supervisor: int) -> None:
    # An engine's parent is the forkserver, which outlives a killed runner worker as long as an engine holds
    # its pipe: so each engine watches its supervisor and exits with it.
    with contextlib.suppress(ProcessLookupError):
        select.select([os.pidfd_open(supervisor)], [], [])
    os._exit(0)


def _start_engine(supervisor: int) -> None:
    global _state
    # A server that stops signals the whole process tree; an engine that died of it first would look like
    # a crash to its supervisor. Engines stop only with their supervisor.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(supervisor,), name="fhe-engine-supervisor", daemon=True).start()
    # Large blocks (keys are tens of MB) always come from mmap, so an evicted key goes back to the system
    # instead of staying in malloc's arenas: the cache bound is a bound on resident memory.
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    _state = _EngineState()


def _return_freed_memory() -> None:
    ctypes.CDLL(None).malloc_trim(0)


def _ping() -> bool:
    return _state is not None


def _classify_run_error(exc: Exception) -> FHEBentoError:
    if "incompatible" in str(exc):  # type info or variance of another circuit
        return FHEBentoError("ciphertext_mismatch", "the ciphertext was not made for this model")
    return FHEBentoError("invalid_ciphertext", "the ciphertext could not be deserialized")


def _run_row(
    model: str, scope: str, key_id: str | None, ciphertext: bytes, deadline: float
) -> tuple[bytes, float] | None:
    """One row, in an engine process: its result and FHE seconds, or None when its request's deadline
    passed before it started."""
    if time.time() > deadline:
        metrics.ROWS.labels(model=model, outcome="dropped").inc()
        return None
    loaded = _state.models[model]
    key = _state.evaluation_key(loaded, scope, key_id)
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


# --- in the runner worker: the supervisor ----------------------------------------------------------


def _context() -> multiprocessing.context.BaseContext:
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


def _is_broken(pool: ProcessPoolExecutor) -> bool:
    # CPython's executor marks itself broken when a child dies; a child that died while idle is seen by
    # its process handle. All three are private, read-only here. A pool that shuts down without being
    # broken (the worker exits, and CPython's exit hook stops its children) has children that end on purpose.
    if getattr(pool, "_broken", False):
        return True
    if getattr(pool, "_shutdown_thread", False):
        return False
    processes = dict(getattr(pool, "_processes", None) or {})
    return any(not p.is_alive() for p in processes.values())


class Engine:
    """The supervisor of one runner worker's engine processes (see the module docstring)."""

    def __init__(
        self,
        processes: int,
        max_failed_starts: int,
        give_up: Callable[[str], None],
        verify_slots: VerifySlots,
    ) -> None:
        self.processes = processes
        self.verify_slots = verify_slots
        self.max_failed_starts = max_failed_starts
        self._give_up = give_up
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.failed_starts = 0
        self.restarts = 0
        self._pool = self._start()
        threading.Thread(target=self._monitor, name="fhe-engine-monitor", daemon=True).start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            self.processes, mp_context=_context(), initializer=_start_engine, initargs=(os.getpid(),)
        )
        pings = [pool.submit(_ping) for _ in range(self.processes)]
        threading.Thread(target=self._await_start, args=(pool, pings), daemon=True).start()
        return pool

    def _await_start(self, pool: ProcessPoolExecutor, pings: list[Future]) -> None:
        try:
            for ping in pings:
                ping.result()
        except BaseException as exc:  # the engine died while loading its models
            log.error("FHE engine failed to start (%s)", type(exc).__name__)
            self._replace(pool, started=False)
            return
        with self._lock:
            if pool is self._pool:
                self.failed_starts = 0
                self._ready.set()
        log.info("FHE engine ready: %d process(es)", self.processes)

    def _replace(self, broken: ProcessPoolExecutor, started: bool = True) -> None:
        """Start a new engine in place of a broken one (once, whoever notices first)."""
        with self._lock:
            if broken is not self._pool:
                return
            self._ready.clear()
            self.restarts += 1
            metrics.ENGINE_RESTARTS.inc()
            if not started:
                self.failed_starts += 1
            if self.failed_starts >= self.max_failed_starts:
                self._pool = None
                broken.shutdown(wait=False, cancel_futures=True)
                self._give_up(f"the FHE engine failed to start {self.failed_starts} times in a row")
                return
            log.error("FHE engine process died: restarting it (restart %d)", self.restarts)
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._start()

    def _monitor(self) -> None:
        while True:
            time.sleep(MONITOR_SECONDS)
            pool = self._pool
            if pool is None:
                return
            if self._ready.is_set() and _is_broken(pool):
                self._replace(pool)

    def ready(self) -> bool:
        return self._ready.is_set()

    def shutdown(self) -> None:
        """Stop the engine processes (a runner in a test process; a served runner's exit with it)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._ready.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, rows: list[tuple]) -> list[tuple[bytes, float] | None]:
        """Evaluate rows (the arguments of `_run_row`) in the engine: (result, FHE seconds) per row, None
        for a row whose deadline passed before it started. Cancelling this drops the rows not started."""
        pool = self._pool
        if pool is None or not self._ready.is_set():
            raise _unavailable("is restarting")
        try:
            futures = [pool.submit(_run_row, *row) for row in rows]
        except BrokenProcessPool:
            self._replace(pool)
            raise _unavailable("process died") from None
        try:
            return [await asyncio.wrap_future(future) for future in futures]
        except BrokenProcessPool:
            self._replace(pool)
            raise _unavailable("process died while computing") from None
        finally:
            dropped = sum(future.cancel() for future in futures)
            if dropped:
                metrics.ROWS.labels(model=rows[0][0], outcome="dropped").inc(dropped)
                log.info("%d rows of a cancelled request dropped before they started", dropped)

    async def verify_key(self, path: str) -> int:
        """Deserialize an upload in a throwaway process, once a verification slot is free (`verify_slots`);
        400 invalid_key if that process dies on it."""
        async with self.verify_slots.slot():
            verifier = ProcessPoolExecutor(1, mp_context=_context())
            try:
                return await asyncio.wrap_future(verifier.submit(_deserialize_key, path))
            except BrokenProcessPool:
                log.warning("the key verifier died on an upload: refused")
                raise FHEBentoError(
                    "invalid_key", "the body is not a serialized concrete evaluation key"
                ) from None
            finally:
                # Its memory is back before the slot is free for the next one (waited for off the event loop).
                await asyncio.to_thread(verifier.shutdown, wait=True)
