"""Settings of the HTTP service and the FHE runner alike, read from `FHE_BENTO_*` environment variables
once per process, by its composition root (`service/app.py`, `runners/fhe_runner.py`), and passed down.
The HTTP service's own settings extend these (`service/settings.py`).

Every field is documented in docs/operations.md's settings table with its default; keep the two in step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fhe_bento.protocol.names import DEMO_MODELS, PART_BYTES, MiB

# Past FHE_BENTO_REQUEST_TIMEOUT a request may still be winding down (BentoML's own deadline comes 5 s later).
STAGING_GRACE_SECONDS = 60
# EMF lines (runtime/emf.py) every this many seconds by default on SageMaker, where the deploy command sets
# FHE_BENTO_ENDPOINT_NAME: CloudWatch's standard resolution is one minute.
DEFAULT_EMF_SECONDS = 60
# A runner served on its own is started with `bentoml serve ... --timeout-keep-alive RUNNER_KEEPALIVE_SECONDS`:
# longer than the 15 s that BentoML's client pool (aiohttp's default) keeps an idle connection, so that the
# HTTP service's side closes first (`service/remote_runner.py`).
RUNNER_KEEPALIVE_SECONDS = 60


S = TypeVar("S", bound="Settings")


@cache
def _from_values_only(cls: type[S]) -> type[S]:
    """`cls` reading only the values it is given: no environment variable, no file."""

    class FromValues(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            **other_sources: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)

    FromValues.__name__ = FromValues.__qualname__ = cls.__name__
    return FromValues


def _bentoml_home() -> Path:
    return Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FHE_BENTO_", extra="ignore")

    models: str = Field(
        default=",".join(DEMO_MODELS),
        description="Comma-separated BentoML model tags to serve (ignored when model_dir is set).",
    )
    model_dir: Path | None = Field(
        default=None, description="A folder of model folders; wins over `models` when set."
    )
    default_model: str | None = Field(
        default=None, description="Model behind the Zama-compatible routes; the first model if unset."
    )
    key_store: str = Field(
        default="", description="Key store URL; empty means file://$BENTOML_HOME/fhe-bento/keys."
    )
    key_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Resident bytes of warm keys each engine process may hold (each key costs its model's "
        "warm_key_bytes); unset: derived from the instance's memory (runners/memory_plan.py); 0 keeps none.",
    )
    max_verifications: int = Field(
        default=0,
        ge=0,
        description="Uploaded keys deserialized at once per worker; 0: derived from cores and memory.",
    )
    max_queued_verifications: int = Field(
        default=0,
        ge=0,
        description="Uploads waiting for a verification per worker, past which: 503; 0: twice the above.",
    )
    max_key_bytes: int = Field(default=256 * MiB, gt=0)
    max_part_bytes: int = Field(
        default=PART_BYTES,
        gt=0,
        description="Largest part of a chunked key upload; a model's key of K bytes has at most ceil(K / this) parts.",
    )
    max_store_bytes: int = Field(
        default=20 * 1024 * MiB,
        gt=0,
        description="Bytes of keys and unfinished uploads stored per model scope.",
    )
    key_ttl_seconds: int = Field(default=0, ge=0, description="Delete keys unused this long; 0 keeps them.")
    upload_ttl_seconds: int = Field(
        default=86400, gt=0, description="Drop unfinished chunked uploads idle this long."
    )
    max_open_uploads: int = Field(
        default=64, gt=0, description="Unfinished chunked uploads in the whole store."
    )
    max_open_uploads_per_scope: int = Field(
        default=4,
        gt=0,
        description="Unfinished chunked uploads per model scope (per tenant when tokens are on).",
    )
    max_ciphertext_bytes: int = Field(default=1 * MiB, gt=0)
    max_batch_bytes: int = Field(default=64 * MiB, gt=0)
    max_batch_rows: int = Field(default=256, gt=0)
    workers: int = Field(
        default=1,
        gt=0,
        description="Worker processes, each with its FHE runner (of the runner served alone).",
    )
    row_threads: int = Field(
        default=1, gt=0, description="Engine processes per worker, each evaluating one row at a time."
    )
    runner_url: str = Field(
        default="",
        description="URL of an FHE runner served elsewhere; empty: each worker holds one in process.",
    )
    engine_max_failed_starts: int = Field(
        default=3,
        gt=0,
        description="Engine starts in a row that may die before they are ready; then the server stops.",
    )
    omp_threads: int = Field(
        default=0, ge=0, description="OpenMP threads per row; 0: cores / (workers x row_threads)."
    )
    max_queue_rows: int = Field(
        default=32, gt=0, description="Rows admitted per model at once (running or queued); past it: 503."
    )
    request_timeout: int = Field(default=600, gt=0, description="Seconds one request may take; past it: 504.")
    staging_dir: Path | None = Field(
        default=None, description="Where uploads are spooled before they are verified."
    )
    endpoint_name: str = Field(
        default="",
        description="The SageMaker endpoint's name (set by the deploy command): the EndpointName dimension of "
        "the EMF lines, which it turns on.",
    )
    emf_seconds: int | None = Field(
        default=None,
        ge=0,
        description="Seconds between EMF lines on stdout; unset: 60 when endpoint_name is set, else 0 (off).",
    )

    @classmethod
    def for_environment(cls, env: Mapping[str, str]) -> Settings:
        """The settings of an instance started with exactly `env` (a deployment's environment), defaults
        for the rest: this process's own environment is not read."""
        prefix = cls.model_config["env_prefix"]
        return _from_values_only(cls)(
            **{k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
        )

    def parallel_rows(self) -> int:
        """Rows one instance evaluates at once: workers x engine processes each."""
        return self.workers * self.row_threads

    def omp_threads_per_row(self) -> int:
        """concrete parallelises the loops of one circuit with OpenMP: split the cores so that workers x
        rows at once x threads per row fill the machine without oversubscribing it."""
        return self.omp_threads or max(1, (os.cpu_count() or 1) // self.parallel_rows())

    def emf_interval(self) -> int:
        """Seconds between the EMF lines of `runtime/emf.py`; 0: none."""
        if self.emf_seconds is not None:
            return self.emf_seconds
        return DEFAULT_EMF_SECONDS if self.endpoint_name else 0

    def model_tags(self) -> list[str]:
        return [tag.strip() for tag in self.models.split(",") if tag.strip()]

    def key_store_url(self) -> str:
        return self.key_store or (_bentoml_home() / "fhe-bento" / "keys").resolve().as_uri()

    def staging_path(self) -> Path:
        path = self.staging_dir or _bentoml_home() / "fhe-bento" / "staging"
        path.mkdir(parents=True, exist_ok=True)
        return path
