"""Where fhe-bento's metrics land in CloudWatch on SageMaker: the names that the container's Embedded
Metric Format lines use and that `fhe-bento sagemaker deploy` / `update` build the dashboard from.

The container writes EMF lines to stdout; SageMaker ships stdout to CloudWatch Logs, which turns them into
metrics in `NAMESPACE`, with the endpoint's name (`ENDPOINT_ENV`, set by the deploy command in the Model's
environment) as a dimension, and per model and version. Metric names are the Prometheus ones of
`runtime/metrics.py` (counters without Prometheus' `_total`).
"""

from __future__ import annotations

NAMESPACE = "fhe-bento"
ENDPOINT_ENV = "FHE_BENTO_ENDPOINT_NAME"  # the endpoint's name, in the container's environment
ENDPOINT_DIMENSION = "EndpointName"

# The dashboard's fhe-bento widgets, per endpoint: (metric, statistic, title).
DASHBOARD_METRICS: tuple[tuple[str, str, str], ...] = (
    ("fhe_bento_rows", "Sum", "ciphertext rows evaluated"),
    ("fhe_bento_fhe_run_seconds", "Average", "FHE seconds per row"),
    ("fhe_bento_serving_overhead_seconds", "Average", "serving seconds per request beyond its FHE"),
    ("fhe_bento_key_cache_misses", "Sum", "cold key loads"),
    ("fhe_bento_key_cache_bytes", "Maximum", "warm-key cache bytes"),
    ("fhe_bento_verification_queue", "Maximum", "key verifications queued"),
    ("fhe_bento_errors", "Sum", "error answers (all codes)"),
    ("fhe_bento_drains", "Sum", "drains on SIGTERM"),
)
