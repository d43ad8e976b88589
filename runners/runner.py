"""The FHE runner: every operation of `RunnerAPI` (`contract/runner_api.py`), carried out in this process.

It checks what a request carries before concrete sees any of it: the model, then the key (its id, that it
is registered for this tenant and not expired: once per request, not per row), then every ciphertext's
Cap'n Proto layout. Only then do the rows go to the supervised engine processes (`runners/supervisor.py`),
the only processes where client bytes reach concrete, so a crash there costs only the rows in flight in
that process. Keys are the key service's (`keys/service.py`).

The HTTP service holds one `Runner` in process (the usual co-located case: no hop but the engine's pipe);
`runners/fhe_runner.py` serves one on its own for an HTTP service elsewhere (`FHE_BENTO_RUNNER_URL`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fhe_bento.checks.payloads import check_ciphertext, check_radix, check_training_values
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import (
    KeyCompletion,
    KeyFacts,
    KeyPart,
    KeyRef,
    KeyUpload,
    PartsHeld,
    PartStored,
    RowResults,
    Rows,
    ScopedKey,
)
from fhe_bento.keys.rules import check_key_id
from fhe_bento.keys.service import KeyService
from fhe_bento.models.repository import ModelSpec, served_spec, training_inputs
from fhe_bento.runners.memory_plan import plan_memory
from fhe_bento.runners.supervisor import Engine
from fhe_bento.runners.verification import KeyVerifier
from fhe_bento.runtime import metrics
from fhe_bento.runtime.lifecycle import stop_server
from fhe_bento.runtime.settings import Settings

log = logging.getLogger("bentoml.fhe_bento.runner")


class Runner:
    def __init__(self, settings: Settings, specs: dict[str, ModelSpec]) -> None:
        self.specs = specs
        memory = plan_memory(settings, specs)
        self.engine = Engine(settings, specs, give_up=stop_server)
        self.verifier = KeyVerifier(memory.verifications, memory.queued_verifications)
        self.keys = KeyService(settings, verify=self.verifier.verify, forget=self.engine.forget)
        log.info(
            "FHE runner started: models=%s engine processes=%d omp_threads=%s memory=%d MB warm-key bound "
            "per engine=%d MB verifications=%d (+%d queued)",
            sorted(specs),
            settings.row_threads,
            settings.omp_threads_per_row(),
            memory.memory // 10**6,
            memory.key_cache_bytes // 10**6,
            memory.verifications,
            memory.queued_verifications,
        )

    async def ready(self) -> bool:
        return self.engine.ready()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _spec(self, tag: str) -> ModelSpec:
        return served_spec(self.specs, tag)

    async def predict(self, rows: Rows) -> RowResults:
        """The rows' results in order. Rows not started by the deadline, or when this call is cancelled
        (its caller went away), are dropped."""
        spec = self._spec(rows.model)
        scope = self.keys.scope(spec, rows.tenant)
        try:
            key_id = await self.keys.usable(spec, scope, rows.key_id)
        except FHEBentoError as exc:
            if exc.code == "unknown_key" and rows.key_id:  # deleted elsewhere (another worker, a replica)
                await self.engine.forget_if_sent(scope, check_key_id(rows.key_id))
            raise
        meta = spec.meta
        for ciphertext in rows.ciphertexts:  # all of them before any row runs
            if meta.training:  # a training step: its four inputs in batch framing (`service/trainings.py`)
                check_training_values(training_inputs(ciphertext), 0, meta.training, spec.name)
            elif meta.radix:  # a TFHE-rs model's row: one radix ciphertext array
                check_radix(ciphertext, meta.radix, spec.name)
            else:
                check_ciphertext(ciphertext, meta.ciphertext_bytes, meta.ciphertext_shape, spec.name)
        done = await self.engine.run(spec.tag, scope, key_id, rows.ciphertexts, rows.deadline)
        if len(done) < len(rows.ciphertexts):
            raise FHEBentoError("request_timeout", "the request's time ran out before all its rows started")
        return RowResults(results=[r for r, _ in done], row_seconds=sum(s for _, s in done) / len(done))

    # --- keys -----------------------------------------------------------------------------------------

    async def register_key(self, upload: KeyUpload) -> KeyFacts:
        """Check a whole key, deserialize it once in a throwaway process, then store it for the tenant."""
        spec = self._spec(upload.model)
        with _counted_rejection(spec.name):
            return await self.keys.register(spec, upload.tenant, upload.key)

    async def put_key_part(self, part: KeyPart) -> PartStored:
        return await self.keys.put_part(
            self._spec(part.model), part.tenant, part.key_id, part.index, part.data
        )

    async def key_parts(self, key: KeyRef) -> PartsHeld:
        return await self.keys.parts(self._spec(key.model), key.tenant, key.key_id)

    async def complete_key(self, completion: KeyCompletion) -> KeyFacts:
        spec = self._spec(completion.model)
        with _counted_rejection(spec.name):
            return await self.keys.complete(spec, completion.tenant, completion.key_id, completion.count)

    async def has_key(self, key: KeyRef) -> bool:
        return await self.keys.has(self._spec(key.model), key.tenant, key.key_id)

    async def delete_key(self, key: KeyRef) -> None:
        await self.keys.delete(self._spec(key.model), key.tenant, key.key_id)

    async def list_keys(self) -> list[dict[str, Any]]:
        return await self.keys.listing()

    async def delete_any_key(self, key: ScopedKey) -> None:
        await self.keys.delete_in_scope(key.scope, key.key_id)


@contextmanager
def _counted_rejection(model: str) -> Iterator[None]:
    """Count and log a key upload that is refused."""
    try:
        yield
    except FHEBentoError as exc:
        metrics.KEY_UPLOADS.labels(model=model, outcome="rejected").inc()
        log.info("key upload rejected: model=%s code=%s", model, exc.code)
        raise
