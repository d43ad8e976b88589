"""The FHE runner: a BentoML service whose workers hold concrete-ml `FHEModelServer`s and a key cache.

It runs as its own worker processes (`bentoml.depends` from the HTTP service), so FHE never blocks the
HTTP event loop, and each sync API method runs in a thread (concrete releases the GIL while it computes).
Runner methods return a `RunnerReply` instead of raising, so that error codes cross the process hop.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml

from runners import metrics
from runners.errors import FHEBentoError, RunnerReply, bad_request, not_found, unprocessable
from runners.key_cache import KeyCache
from runners.key_registry import KeyRegistry
from runners.key_store import open_store, tenant_scope
from runners.model_repo import ModelSpec, load_specs
from runners.settings import get_settings

log = logging.getLogger("bentoml.fhe_bento.runner")
settings = get_settings()


def _fhe():
    from concrete import fhe  # imported lazily: this module is also imported by the HTTP process

    return fhe


class LoadedModel:
    def __init__(self, spec: ModelSpec) -> None:
        from concrete.ml.deployment import FHEModelServer

        self.spec = spec
        self.server = FHEModelServer(str(spec.path))
        # A model without bootstrapping has an empty keyset: its whole evaluation key is the header.
        self.builtin_key = None
        if not spec.meta.needs_key:
            self.builtin_key = _fhe().EvaluationKeys.deserialize(bytes.fromhex(spec.meta.eval_key_header))

    def check_fits(self, key: bytes) -> None:
        meta = self.spec.meta
        if len(key) != meta.eval_key_bytes or not key.startswith(bytes.fromhex(meta.eval_key_header)):
            raise unprocessable(
                "key_mismatch",
                f"this evaluation key was not made for model {self.spec.name!r} "
                f"(expected {meta.eval_key_bytes} bytes with this model's key parameters)",
            )


def _classify_run_error(exc: Exception) -> FHEBentoError:
    text = str(exc)
    if "incompatible" in text:  # type info or variance of another circuit
        return unprocessable("ciphertext_mismatch", "the ciphertext was not made for this model")
    return bad_request("invalid_ciphertext", "the ciphertext could not be deserialized")


@bentoml.service(
    name="fhe_runner",
    workers=settings.workers,
    # BentoML runs at most `threads` sync calls of one worker at once (default 1, which would serialise
    # concurrent requests). The row pool bounds the FHE work; the two extra threads let key registrations
    # and readiness checks through while rows compute.
    threads=settings.row_threads + 2,
    traffic={"timeout": settings.request_timeout},
)
class FHERunner:
    def __init__(self) -> None:
        # Read by the OpenMP runtime when concrete first computes, so it must be set before that.
        os.environ["OMP_NUM_THREADS"] = str(settings.omp_threads_per_row())
        self.models = {name: LoadedModel(spec) for name, spec in load_specs(settings).items()}
        self.keys = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.cache = KeyCache(settings.key_cache_bytes)
        self.rows_pool = ThreadPoolExecutor(settings.row_threads, thread_name_prefix="fhe-row")
        log.info("FHE runner ready: models=%s row_threads=%d omp_threads=%s", sorted(self.models),
                 settings.row_threads, os.environ["OMP_NUM_THREADS"])

    @bentoml.api
    def ready(self) -> bool:
        return True

    def _model(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise not_found("unknown_model", f"no model named {name!r} is served") from None

    def _evaluation_key(self, model: LoadedModel, tenant: str, key_id: str | None) -> Any:
        if model.builtin_key is not None:
            return model.builtin_key
        if not key_id:
            raise bad_request("missing_key_id", "this model needs an evaluation key: send X-FHE-Key-Id")
        scope = tenant_scope(model.spec.key_scope, tenant)
        if not self.keys.has(scope, key_id):
            self.cache.discard((scope, key_id))  # deleted or expired: a cached copy must not outlive it
            raise not_found("unknown_key", f"key {key_id} is not registered for model {model.spec.name!r}")

        def load() -> tuple[Any, int]:
            data = self.keys.store.read(scope, key_id)
            return _fhe().EvaluationKeys.deserialize(data), len(data)

        key, hit = self.cache.get_or_load((scope, key_id), load)
        self.keys.mark_used(scope, key_id)
        metrics.KEY_CACHE.labels(model=model.spec.name, result="hit" if hit else "miss").inc()
        return key

    def _run_row(self, model: LoadedModel, key: Any, ciphertext: bytes) -> bytes:
        started = time.perf_counter()
        try:
            result = model.server.run(ciphertext, key)
        except (RuntimeError, ValueError, AssertionError) as exc:
            metrics.ROWS.labels(model=model.spec.name, outcome="error").inc()
            raise _classify_run_error(exc) from exc
        metrics.FHE_RUN_SECONDS.labels(model=model.spec.name).observe(time.perf_counter() - started)
        metrics.ROWS.labels(model=model.spec.name, outcome="ok").inc()
        return result

    @bentoml.api
    def predict(self, model: str, tenant: str, key_id: str | None, ciphertext: bytes) -> RunnerReply:
        try:
            loaded = self._model(model)
            key = self._evaluation_key(loaded, tenant, key_id)
            # Through the row pool, like batch rows: at most row_threads rows compute at once per worker.
            return RunnerReply(payload=self.rows_pool.submit(self._run_row, loaded, key, ciphertext).result())
        except FHEBentoError as exc:
            return RunnerReply.failed(exc)

    @bentoml.api
    def predict_batch(self, model: str, tenant: str, key_id: str | None, ciphertexts: list[bytes]) -> RunnerReply:
        try:
            loaded = self._model(model)
            key = self._evaluation_key(loaded, tenant, key_id)
            results = list(self.rows_pool.map(lambda ct: self._run_row(loaded, key, ct), ciphertexts))
            return RunnerReply(payload=results)
        except FHEBentoError as exc:
            return RunnerReply.failed(exc)

    @bentoml.api
    def register_key(self, model: str, tenant: str, key_id: str, staged_path: str) -> RunnerReply:
        """Verify a spooled upload and store it for the tenant; the caller deletes the spool file."""
        try:
            loaded = self._model(model)
            return RunnerReply(info=self._register(loaded, tenant, key_id, Path(staged_path)))
        except FHEBentoError as exc:
            metrics.KEY_UPLOADS.labels(model=model, outcome="rejected").inc()
            log.info("key upload rejected: model=%s bytes=%s code=%s", model, _size(staged_path), exc.code)
            return RunnerReply.failed(exc)

    def _register(self, model: LoadedModel, tenant: str, key_id: str, staged: Path) -> dict:
        scope = tenant_scope(model.spec.key_scope, tenant)
        size = staged.stat().st_size
        if self.keys.has(scope, key_id):
            metrics.KEY_UPLOADS.labels(model=model.spec.name, outcome="exists").inc()
            return {"key_id": key_id, "bytes": size, "created": False}
        data = staged.read_bytes()
        try:
            key = _fhe().EvaluationKeys.deserialize(data)
        except RuntimeError:
            raise bad_request("invalid_key", "the body is not a serialized concrete evaluation key") from None
        model.check_fits(data)
        created = self.keys.put(scope, key_id, staged, {"model": model.spec.name, "bytes": size, "owner": tenant})
        self.cache.put((scope, key_id), key, size)
        metrics.KEY_UPLOADS.labels(model=model.spec.name, outcome="created" if created else "exists").inc()
        log.info("key registered: model=%s key_id=%s bytes=%d created=%s", model.spec.name, key_id, size, created)
        return {"key_id": key_id, "bytes": size, "created": created}


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
