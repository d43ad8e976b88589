"""Settings only the HTTP service reads: request framing, bearer tokens, SageMaker sessions."""

from __future__ import annotations

from pydantic import Field, SecretStr

from fhe_bento.runtime.settings import Settings


class ServiceSettings(Settings):
    body_idle_seconds: int = Field(
        default=30, gt=0, description="Seconds a request body may stall between two chunks; past it: 408."
    )
    max_header_bytes: int = Field(
        default=16 * 1024, gt=0, description="Bytes of request line and headers together; past it: 431."
    )
    predict_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated bearer tokens that may predict and manage their own keys.",
    )
    admin_tokens: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated bearer tokens that may also list and delete every key.",
    )
    drain_seconds: int = Field(
        default=20,
        ge=0,
        description="Seconds a worker waits on SIGTERM for its requests in flight before it stops "
        "(SageMaker kills 30 s after SIGTERM).",
    )
    versions_refresh_seconds: int = Field(
        default=2,
        ge=0,
        description="Seconds between two reads of the model versions' shared state (default, retired) from "
        "the key store; 0 reads it only at start.",
    )
    training_ttl_seconds: int = Field(
        default=7 * 86400,
        ge=0,
        description="Training sessions idle this long are removed with their weights; 0 keeps them.",
    )
    max_trainings_per_scope: int = Field(
        default=16,
        gt=0,
        description="Training sessions one token may hold at once per model version; past it: 429.",
    )
    session_seconds: int = Field(
        default=1200,
        ge=0,
        description="Lifetime of a SageMaker stateful session (key affinity); 0 opens none.",
    )
