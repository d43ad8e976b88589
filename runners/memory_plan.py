"""How an instance spends its memory: warm keys and key verifications, derived from the memory it really
has (its cgroup limit in a container, else the machine's), unless a setting fixes them.

An instance's peak resident memory is at most (docs/operations.md, "Memory"):

    BASE_RESIDENT_BYTES                                    the server with its models loaded, no key
  + engines x key_cache_bytes                              warm keys (each costs its model's warm_key_bytes)
  + verifications x verify_cost                            uploads being deserialized in throwaway processes
  + (verifications + queued_verifications) x 2 x key_bytes uploads held by the routes and the key service

where verify_cost is the largest model's warm_key_bytes + 2 x its key bytes. By default, verifications
run at most one per core, and at most as many as a tenth of the memory above the base pays for; twice as
many may wait; and the warm keys get what is left of 80 % of the memory above the base, split between the
engine processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from fhe_bento.models.repository import ModelSpec
from fhe_bento.protocol.names import MiB
from fhe_bento.runtime.settings import Settings

# Measured (docs/operations.md, "Memory"): 1.5 GB resident for the whole server with the demo models loaded and no
# key; rounded up for the allocator's slack.
BASE_RESIDENT_BYTES = 2048 * MiB
USABLE_SHARE = 0.8  # of the memory above the base: the rest is headroom for requests and fragmentation
VERIFY_SHARE = 0.1  # of the memory above the base that verifications may take by default
QUEUED_PER_RUNNING = 2
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def instance_memory() -> int:
    """The memory this instance may use: its cgroup's limit (v2, then v1) when lower than the machine's."""
    memory = psutil.virtual_memory().total
    for path in _CGROUP_LIMITS:
        try:
            limit = path.read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            memory = min(memory, int(limit))
    return memory


@dataclass(frozen=True)
class MemoryPlan:
    memory: int
    verify_cost: int  # resident bytes one verification costs while it runs
    key_bytes: int  # the largest serialized key
    verifications: int  # at once, per worker
    queued_verifications: int  # waiting, per worker; past it: 503 overloaded
    key_cache_bytes: int  # resident bytes of warm keys, per engine process

    def peak_bytes(self, workers: int, engines_per_worker: int) -> int:
        """The bound on the instance's resident memory (the module docstring's formula)."""
        uploads = self.verifications + self.queued_verifications
        return BASE_RESIDENT_BYTES + workers * (
            engines_per_worker * self.key_cache_bytes
            + self.verifications * self.verify_cost
            + uploads * 2 * self.key_bytes
        )


def plan_memory(settings: Settings, specs: dict[str, ModelSpec], memory: int | None = None) -> MemoryPlan:
    memory = memory or instance_memory()
    keyed = [spec.meta for spec in specs.values() if spec.meta.needs_key]
    key_bytes = max((meta.eval_key_bytes for meta in keyed), default=0)
    verify_cost = max((meta.warm_key_bytes + 2 * meta.eval_key_bytes for meta in keyed), default=0)
    above_base = max(0, memory - BASE_RESIDENT_BYTES)
    workers = settings.workers
    verifications = settings.max_verifications or max(
        1,
        min(
            (os.cpu_count() or 1) // workers, int(VERIFY_SHARE * above_base / workers // max(verify_cost, 1))
        ),
    )
    queued = settings.max_queued_verifications or QUEUED_PER_RUNNING * verifications
    if settings.key_cache_bytes is not None:
        cache = settings.key_cache_bytes
    else:
        uploads = workers * (verifications * verify_cost + (verifications + queued) * 2 * key_bytes)
        cache = max(0, int(USABLE_SHARE * above_base) - uploads) // settings.parallel_rows()
    return MemoryPlan(
        memory=memory,
        verify_cost=verify_cost,
        key_bytes=key_bytes,
        verifications=verifications,
        queued_verifications=queued,
        key_cache_bytes=cache,
    )
