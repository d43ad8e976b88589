"""The key service: the one owner of the evaluation-key lifecycle, in the runner.

Whole uploads, chunked parts and their assembly, checks, verification, storage, listing and deletion all
go through it, and it alone turns a (model, tenant) into a store scope. Key bytes reach it through the
runner's API (`runners/fhe_runner.py`), never as a path on another process's disk, so the HTTP service
may run on another machine (`FHE_BENTO_RUNNER_URL`). Spool files live in this process's own staging
directory. Store calls may be network round trips (s3://), so they run in threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fhe_bento.checks.payloads import check_key
from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.contract.runner_api import KeyFacts, PartsHeld, PartStored
from fhe_bento.keys.registry import KeyRegistry
from fhe_bento.keys.rules import check_key_id, check_key_size
from fhe_bento.keys.store import tenant_scope
from fhe_bento.keys.store_url import open_store
from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol import keys
from fhe_bento.runtime import metrics, staging
from fhe_bento.runtime.settings import Settings

log = logging.getLogger("bentoml.fhe_bento.keys")


class KeyService:
    def __init__(
        self,
        settings: Settings,
        verify: Callable[[str], Awaitable[int]],
        forget: Callable[[str, str], Awaitable[None]],
    ) -> None:
        """`verify(path)` deserializes a checked upload as concrete will, in a throwaway process;
        `forget(scope, key_id)` drops a deleted key from the engines' warm-key caches."""
        self.registry = KeyRegistry(open_store(settings.key_store_url()), settings)
        self.staging = settings.staging_path()
        self.max_key_bytes = settings.max_key_bytes
        self._verify = verify
        self._forget = forget

    @staticmethod
    def scope(spec: ModelSpec, tenant: str) -> str:
        """Where one tenant's keys and training sessions of one model version live (the only place a scope is
        computed)."""
        return tenant_scope(spec.key_scope, tenant)

    # --- whole keys -----------------------------------------------------------------------------------

    async def usable(self, spec: ModelSpec, scope: str, key_id: str | None) -> str | None:
        """The key that a request's rows run with, checked once for all of them: None for a model whose
        key is built in; else a registered, unexpired key of this scope, marked as used (its TTL)."""
        if not spec.meta.needs_key:
            return None
        if not key_id:
            raise FHEBentoError("missing_key_id", "this model needs an evaluation key: send its key id")
        key_id = check_key_id(key_id)
        if not await asyncio.to_thread(self.registry.use, scope, key_id):
            raise FHEBentoError("unknown_key", f"key {key_id} is not registered for model {spec.name!r}")
        return key_id

    async def register(self, spec: ModelSpec, tenant: str, key: bytes) -> KeyFacts:
        """Check, verify and store a whole key; its id is its SHA-256."""
        check_key_size(len(key), self.max_key_bytes)
        key_id = await asyncio.to_thread(keys.key_id, key)
        scope = self.scope(spec, tenant)
        if await asyncio.to_thread(self.registry.has, scope, key_id):
            return self._exists(spec, key_id, len(key))
        await asyncio.to_thread(check_key, key, spec.meta.eval_key_bytes, spec.meta.key_shape, spec.name)
        path = staging.spool_path(self.staging, "upload")
        try:
            await asyncio.to_thread(path.write_bytes, key)
            return await self._store_verified(spec, tenant, scope, key_id, path)
        finally:
            path.unlink(missing_ok=True)

    async def _store_verified(
        self, spec: ModelSpec, tenant: str, scope: str, key_id: str, path: Path
    ) -> KeyFacts:
        size = await self._verify(str(path))
        info = {"model": spec.name, "bytes": size, "owner": tenant}
        created = await asyncio.to_thread(self.registry.put, scope, key_id, path, info)
        metrics.KEY_UPLOADS.labels(model=spec.name, outcome="created" if created else "exists").inc()
        log.info("key registered: model=%s key_id=%s bytes=%d created=%s", spec.name, key_id, size, created)
        return KeyFacts(key_id=key_id, bytes=size, created=created)

    @staticmethod
    def _exists(spec: ModelSpec, key_id: str, size: int) -> KeyFacts:
        metrics.KEY_UPLOADS.labels(model=spec.name, outcome="exists").inc()
        return KeyFacts(key_id=key_id, bytes=size, created=False)

    async def has(self, spec: ModelSpec, tenant: str, key_id: str) -> bool:
        return await asyncio.to_thread(self.registry.has, self.scope(spec, tenant), check_key_id(key_id))

    async def delete(self, spec: ModelSpec, tenant: str, key_id: str) -> None:
        await self._delete(self.scope(spec, tenant), check_key_id(key_id), f"for model {spec.name!r}")

    async def delete_in_scope(self, scope: str, key_id: str) -> None:
        """Delete a key found with `listing` (admin)."""
        if not keys.is_key_id(scope):  # as the listing shows it
            raise FHEBentoError(
                "invalid_scope", "a scope is the 64-character hex id that the key listing shows"
            )
        await self._delete(scope, check_key_id(key_id), f"in scope {scope}")

    async def _delete(self, scope: str, key_id: str, where: str) -> None:
        if not await asyncio.to_thread(self.registry.delete, scope, key_id):
            raise FHEBentoError("unknown_key", f"key {key_id} is not registered {where}")
        await self._forget(scope, key_id)  # in this request: no engine keeps a warm copy
        log.info("key deleted: scope=%s key_id=%s", scope[:12], key_id)

    async def listing(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.registry.listing)

    # --- chunked uploads ------------------------------------------------------------------------------

    async def put_part(
        self, spec: ModelSpec, tenant: str, key_id: str, index: int, data: bytes
    ) -> PartStored:
        key_id = check_key_id(key_id)
        await asyncio.to_thread(
            self.registry.put_part,
            self.scope(spec, tenant),
            key_id,
            index,
            data,
            model=spec.name,
            key_bytes=spec.meta.eval_key_bytes,
        )
        metrics.PART_BYTES.labels(model=spec.name).inc(len(data))
        return PartStored(key_id=key_id, part=index, bytes=len(data))

    async def parts(self, spec: ModelSpec, tenant: str, key_id: str) -> PartsHeld:
        key_id = check_key_id(key_id)
        parts = await asyncio.to_thread(self.registry.parts, self.scope(spec, tenant), key_id)
        return PartsHeld(key_id=key_id, parts=sorted(parts), bytes=sum(parts.values()))

    async def complete(self, spec: ModelSpec, tenant: str, key_id: str, count: int) -> KeyFacts:
        """Join parts 0..count-1, check the SHA-256 against the key id, then register as a whole upload."""
        key_id = check_key_id(key_id)
        most = self.registry.max_parts(spec.meta.eval_key_bytes)
        if not 0 < count <= most:
            raise FHEBentoError("invalid_part", f"a key of model {spec.name!r} has 1 to {most} parts")
        scope = self.scope(spec, tenant)
        assembled = await asyncio.to_thread(self._assemble, scope, key_id, count)
        if isinstance(assembled, int):
            return self._exists(spec, key_id, assembled)
        try:
            check_key(
                await asyncio.to_thread(assembled.read_bytes),
                spec.meta.eval_key_bytes,
                spec.meta.key_shape,
                spec.name,
            )
            return await self._store_verified(spec, tenant, scope, key_id, assembled)
        finally:
            assembled.unlink(missing_ok=True)
            await asyncio.to_thread(self.registry.drop_parts, scope, key_id)

    def _assemble(self, scope: str, key_id: str, count: int) -> Path | int:
        """The joined, digest-checked parts in a spool file; or the key's size if it is registered already
        (by an earlier or a concurrent completion)."""
        registry = self.registry
        if registry.has(scope, key_id):
            registry.drop_parts(scope, key_id)
            return registry.size(scope, key_id)
        path = staging.spool_path(self.staging, "assembled")
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("wb") as fh:
                for chunk in registry.assemble_parts(scope, key_id, count):
                    size += len(chunk)
                    check_key_size(size, self.max_key_bytes)
                    digest.update(chunk)
                    fh.write(chunk)
            if digest.hexdigest() != key_id:
                raise FHEBentoError(
                    "digest_mismatch", f"the {count} parts do not hash to key id {key_id}; resend them"
                )
        except FHEBentoError as exc:
            path.unlink(missing_ok=True)
            if exc.code == "missing_parts" and registry.has(scope, key_id):
                return registry.size(scope, key_id)  # a concurrent twin won
            if exc.code != "missing_parts":  # missing parts can still come; anything else starts over
                registry.drop_parts(scope, key_id)
            raise
        return path
