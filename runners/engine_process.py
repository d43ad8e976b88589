"""Inside an engine process: the only processes in which client bytes reach concrete.

An engine process loads the served models (concrete-ml's `FHEModelServer`) and its own warm-key cache,
says `LOADED`, then evaluates the rows its supervisor (`runners/supervisor.py`) sends, one at a time,
over the pipe of `runners/engine_pipe.py`. It ignores the server's stop signals and exits with its
supervisor. A key verifier (`runners/verification.py`) is a throwaway process that deserializes one upload
as an engine would.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.keys.cache import KeyCache
from fhe_bento.keys.registry import KeyRegistry
from fhe_bento.keys.store_url import open_store
from fhe_bento.models.repository import ModelSpec, training_inputs
from fhe_bento.protocol import wire
from fhe_bento.runners import fhe_server
from fhe_bento.runners.engine_pipe import LOADED, Forget, RowResult, send_row_answer
from fhe_bento.runners.memory_plan import plan_memory
from fhe_bento.runtime import metrics
from fhe_bento.runtime.settings import Settings


def _fhe() -> Any:
    from concrete import fhe

    return fhe


# --- inside an engine process ----------------------------------------------------------------------


class _LoadedModel:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.server = fhe_server.load_server(spec.path, tfhe_rs=spec.meta.radix is not None)
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

    def forget(self, key: Forget) -> None:
        """A deleted key leaves the warm-key cache, and its memory goes back to the system."""
        self.cache.discard((key.scope, key.key_id))
        _return_freed_memory()

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
            # Stored keys passed checks/payloads.py and the throwaway verification when they were uploaded.
            return _fhe().EvaluationKeys.deserialize(
                self.keys.read(scope, key_id)
            ), model.spec.meta.warm_key_bytes

        key, hit = self.cache.get_or_load((scope, key_id), load)
        if not hit:
            _return_freed_memory()  # keys the load evicted
        metrics.KEY_CACHE.labels(
            model=model.spec.name, version=model.spec.version, result="hit" if hit else "miss"
        ).inc()
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
    loaded = state.models[model]
    labels = {"model": loaded.spec.name, "version": loaded.spec.version}
    if time.time() > deadline:
        metrics.ROWS.labels(**labels, outcome="dropped").inc()
        return None
    key = state.evaluation_key(loaded, scope, key_id)
    training = loaded.spec.meta.training is not None
    started = time.perf_counter()
    try:
        # A training step's row frames its four inputs, and its result frames the new (weights, bias).
        result = fhe_server.run(
            loaded.server, tuple(training_inputs(ciphertext)) if training else ciphertext, key
        )
    except (RuntimeError, ValueError, AssertionError) as exc:
        metrics.ROWS.labels(**labels, outcome="error").inc()
        raise _classify_run_error(exc) from None
    answer = wire.encode_batch(result) if isinstance(result, tuple) else result
    seconds = time.perf_counter() - started
    metrics.FHE_RUN_SECONDS.labels(**labels).observe(seconds)
    metrics.ROWS.labels(**labels, outcome="ok").inc()
    return answer, seconds


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


def engine_main(conn: Connection, supervisor: int, settings: Settings, specs: dict[str, ModelSpec]) -> None:
    """An engine process: load the models (`specs`, checked by its supervisor's process), say so, then
    evaluate the rows its supervisor sends, one at a time, until it sends None or goes away. A start that
    raises ends the process before it is loaded."""
    state = _start_engine(supervisor, settings, specs)
    conn.send(LOADED)
    with contextlib.suppress(EOFError):
        while (message := conn.recv()) is not None:
            if isinstance(message, Forget):
                send_row_answer(conn, _outcome(state.forget, message))
            else:
                send_row_answer(conn, _outcome(_run_row, state, *message))


def verify_main(conn: Connection, path: str) -> None:
    conn.send(_outcome(_deserialize_key, path))
