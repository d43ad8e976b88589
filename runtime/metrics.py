"""Prometheus metrics of fhe-bento, exported on BentoML's `/metrics` next to BentoML's own."""

from __future__ import annotations

import bentoml

FHE_RUN_SECONDS = bentoml.metrics.Histogram(
    name="fhe_bento_fhe_run_seconds",
    documentation="Seconds of FHE evaluation per ciphertext row",
    labelnames=["model"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
KEY_CACHE = bentoml.metrics.Counter(
    name="fhe_bento_key_cache",
    documentation="Evaluation-key lookups in the worker cache, by result (hit or miss)",
    labelnames=["model", "result"],
)
KEY_UPLOADS = bentoml.metrics.Counter(
    name="fhe_bento_key_uploads",
    documentation="Evaluation-key uploads by outcome (created, exists, rejected)",
    labelnames=["model", "outcome"],
)
ROWS = bentoml.metrics.Counter(
    name="fhe_bento_rows",
    documentation="Ciphertext rows evaluated, by outcome (ok or error)",
    labelnames=["model", "outcome"],
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
