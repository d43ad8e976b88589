"""Where fhe-bento's metrics land in CloudWatch on SageMaker: the names that the container's Embedded
Metric Format lines use and that `fhe-bento sagemaker deploy` / `update` build the dashboard from.

The container writes EMF lines to stdout (`runtime/emf.py`); SageMaker ships stdout to CloudWatch Logs,
which turns them into metrics in `NAMESPACE`, with the endpoint's name (`ENDPOINT_ENV`, set by the deploy
command in the Model's environment) as a dimension, and per model and version. Metric names are the
Prometheus ones of `runtime/metrics.py`: a counter without Prometheus' `_total`, a histogram as its `_sum`
and `_count`, and a label value that is not a dimension as a suffix (`fhe_bento_key_cache_misses`). Every
line also carries the endpoint's name alone as a dimension set, which the dashboard reads.
"""

from __future__ import annotations

NAMESPACE = "fhe-bento"
ENDPOINT_ENV = "FHE_BENTO_ENDPOINT_NAME"  # the endpoint's name, in the container's environment
ENDPOINT_DIMENSION = "EndpointName"

# The dashboard's fhe-bento widgets, per endpoint: (metric, statistic, title). Each is a metric the EMF lines
# carry with the endpoint's name alone as a dimension set (tests/unit/test_emf.py).
DASHBOARD_METRICS: tuple[tuple[str, str, str], ...] = (
    ("fhe_bento_rows", "Sum", "ciphertext rows evaluated"),
    ("fhe_bento_fhe_run_seconds_sum", "Sum", "FHE seconds (all rows)"),
    ("fhe_bento_serving_overhead_seconds_sum", "Sum", "serving seconds beyond FHE (all requests)"),
    ("fhe_bento_key_cache_misses", "Sum", "cold key loads"),
    ("fhe_bento_key_cache_bytes", "Maximum", "warm-key cache bytes"),
    ("fhe_bento_key_verifications_queued", "Maximum", "key verifications queued"),
    ("fhe_bento_errors", "Sum", "error answers (all codes)"),
    ("fhe_bento_drains", "Sum", "drains on SIGTERM"),
)
