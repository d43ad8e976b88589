"""Prometheus metrics of fhe-bento, exported on BentoML's `/metrics` next to BentoML's own, and the one
source of the CloudWatch EMF lines on SageMaker (`runtime/emf.py`). Metrics of one model carry its served
name and version (`model`, `version`) where the model's spec is at hand wherever they are counted."""

from __future__ import annotations

import os

import bentoml

FHE_RUN_SECONDS = bentoml.metrics.Histogram(
    name="fhe_bento_fhe_run_seconds",
    documentation="Seconds of FHE evaluation per ciphertext row",
    labelnames=["model", "version"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
KEY_CACHE = bentoml.metrics.Counter(
    name="fhe_bento_key_cache",
    documentation="Evaluation-key lookups in the engines' warm-key caches, by result (hit, or miss: a cold load)",
    labelnames=["model", "version", "result"],
)
KEY_UPLOADS = bentoml.metrics.Counter(
    name="fhe_bento_key_uploads",
    documentation="Evaluation-key uploads by outcome (created, exists, rejected)",
    labelnames=["model", "outcome"],
)
ROWS = bentoml.metrics.Counter(
    name="fhe_bento_rows",
    documentation="Ciphertext rows, by outcome (ok, error, or dropped: not started by its request's deadline)",
    labelnames=["model", "version", "outcome"],
)
STORE_BYTES = bentoml.metrics.Gauge(
    name="fhe_bento_key_store_bytes",
    documentation="Bytes of evaluation keys in the key store, per model (as last seen by a write)",
    labelnames=["model"],
    multiprocess_mode="mostrecent",
)
PART_BYTES = bentoml.metrics.Counter(
    name="fhe_bento_key_part_bytes",
    documentation="Bytes received in parts of chunked key uploads (upload progress)",
    labelnames=["model"],
)
QUEUE_ROWS = bentoml.metrics.Gauge(
    name="fhe_bento_queue_rows",
    documentation="Rows admitted and not yet answered (running or queued), per model",
    labelnames=["model"],
    multiprocess_mode="livesum",
)
OVERLOADED = bentoml.metrics.Counter(
    name="fhe_bento_overloaded",
    documentation="Requests refused with 503 overloaded because the model's queue was full",
    labelnames=["model"],
)
AUTH_REFUSED = bentoml.metrics.Counter(
    name="fhe_bento_auth_refused",
    documentation="Requests refused by the bearer-token check, by code (auth_required, invalid_token, forbidden)",
    labelnames=["code"],
)
SESSIONS = bentoml.metrics.Counter(
    name="fhe_bento_sessions",
    documentation="SageMaker stateful sessions (key affinity), by outcome "
    "(opened: issued to a NEW_SESSION request, or invalid: refused)",
    labelnames=["outcome"],
)
ENGINE_RESTARTS = bentoml.metrics.Counter(
    name="fhe_bento_engine_restarts",
    documentation="FHE engine processes started again after one died (a crash that validation missed, or a kill)",
)
VERIFICATIONS = bentoml.metrics.Gauge(
    name="fhe_bento_key_verifications",
    documentation="Uploaded keys being verified (running) or waiting for a verification slot (queued)",
    labelnames=["state"],
    multiprocess_mode="livesum",
)
VERIFICATIONS_REFUSED = bentoml.metrics.Counter(
    name="fhe_bento_key_verifications_refused",
    documentation="Key uploads refused with 503 overloaded because every verification slot and queue place was taken",
)
DRAINS = bentoml.metrics.Counter(
    name="fhe_bento_drains",
    documentation="Drains on SIGTERM, by outcome (drained: every request in flight finished; timed_out: "
    "FHE_BENTO_DRAIN_SECONDS ran out first)",
    labelnames=["outcome"],
)
SERVING_OVERHEAD = bentoml.metrics.Histogram(
    name="fhe_bento_serving_overhead_seconds",
    documentation="Seconds a prediction request spent in the service's operations beyond its rows' FHE seconds "
    "(checks, the engine's pipe, waiting for an engine process)",
    labelnames=["model", "version"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = bentoml.metrics.Counter(
    name="fhe_bento_errors",
    documentation="Error answers of the service, by code (`service/responses.error_response`)",
    labelnames=["code"],
)
KEY_CACHE_BYTES = bentoml.metrics.Gauge(
    name="fhe_bento_key_cache_bytes",
    documentation="Resident bytes of the warm keys the engine processes hold (each counted as its model's "
    "warm_key_bytes), summed over the live engine processes",
    multiprocess_mode="livesum",
)


def process_ended(pid: int | None) -> None:
    """A process that set `livesum` gauges (an engine process) has ended: its values leave the sums."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # else: this process's own gauges
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
