"""The CloudWatch EMF lines (runtime/emf.py): their shape as the EMF specification gives it, their values as
the increase between two snapshots of the Prometheus samples, and the exporter's timer and last line."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fhe_bento.runtime import emf
from fhe_bento.runtime.cloudwatch import DASHBOARD_METRICS, ENDPOINT_DIMENSION, NAMESPACE

WHEN = datetime.now(UTC).replace(microsecond=678000)  # CloudWatch takes lines of the last 14 days
XGB = (("model", "xgb"), ("version", "v1"))


def sample(name: str, value: float, **labels: str) -> tuple[tuple[str, emf.Labels], float]:
    return (name, tuple(sorted(labels.items()))), value


def lines(previous: emf.Snapshot, current: emf.Snapshot) -> list[dict]:
    return [json.loads(line) for line in emf.emf_lines(previous, current, "prod", WHEN)]


def directive(line: dict) -> dict:
    """The line's one CloudWatchMetrics directive, checked against the specification's required members."""
    aws = line["_aws"]
    assert isinstance(aws["Timestamp"], int)
    [directive] = aws["CloudWatchMetrics"]
    assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
    for dimension_set in directive["Dimensions"]:
        assert all(isinstance(line[name], str) and line[name] for name in dimension_set)  # target members
    for metric in directive["Metrics"]:
        assert isinstance(line[metric["Name"]], int | float)
    return directive


def values(line: dict) -> dict[str, float]:
    return {metric["Name"]: line[metric["Name"]] for metric in directive(line)["Metrics"]}


def by_dimensions(found: list[dict]) -> dict[tuple, dict]:
    return {tuple(tuple(s) for s in directive(line)["Dimensions"]): line for line in found}


def test_a_model_line_is_emf_with_the_namespace_the_endpoint_model_and_version_as_dimensions():
    current = dict(
        [
            sample("fhe_bento_rows_total", 3, model="xgb", version="v1", outcome="ok"),
            sample("fhe_bento_fhe_run_seconds_sum", 2.5, model="xgb", version="v1"),
            sample("fhe_bento_fhe_run_seconds_count", 3, model="xgb", version="v1"),
        ]
    )
    model_line = by_dimensions(lines({}, current))[(("EndpointName", "model", "version"), ("EndpointName",))]
    assert model_line["_aws"]["Timestamp"] == round(WHEN.timestamp() * 1000)  # milliseconds since the epoch
    assert model_line["_aws"]["Timestamp"] % 1000 == 678
    found = directive(model_line)
    assert found["Namespace"] == NAMESPACE
    assert (model_line[ENDPOINT_DIMENSION], model_line["model"], model_line["version"]) == (
        "prod",
        "xgb",
        "v1",
    )
    assert {m["Name"]: m["Unit"] for m in found["Metrics"]} == {
        "fhe_bento_rows": "Count",
        "fhe_bento_fhe_run_seconds_sum": "Seconds",
        "fhe_bento_fhe_run_seconds_count": "Count",
        "fhe_bento_serving_overhead_seconds_sum": "Seconds",
        "fhe_bento_serving_overhead_seconds_count": "Count",
        "fhe_bento_key_cache_misses": "Count",
    }
    assert values(model_line)["fhe_bento_rows"] == 3


def test_counters_and_histograms_are_their_increase_gauges_their_value_now():
    previous = dict(
        [
            sample("fhe_bento_rows_total", 10, model="xgb", version="v1", outcome="ok"),
            sample("fhe_bento_rows_total", 1, model="xgb", version="v1", outcome="error"),
            sample("fhe_bento_fhe_run_seconds_sum", 20.0, model="xgb", version="v1"),
            sample("fhe_bento_fhe_run_seconds_count", 11, model="xgb", version="v1"),
            sample("fhe_bento_key_cache_total", 2, model="xgb", version="v1", result="miss"),
            sample("fhe_bento_key_cache_bytes", 800),
            sample("fhe_bento_drains_total", 0, outcome="drained"),
        ]
    )
    current = dict(
        [
            sample("fhe_bento_rows_total", 14, model="xgb", version="v1", outcome="ok"),
            sample("fhe_bento_rows_total", 2, model="xgb", version="v1", outcome="error"),
            sample("fhe_bento_rows_total", 7, model="xgb", version="v1", outcome="dropped"),  # not evaluated
            sample("fhe_bento_fhe_run_seconds_sum", 30.5, model="xgb", version="v1"),
            sample("fhe_bento_fhe_run_seconds_count", 16, model="xgb", version="v1"),
            sample("fhe_bento_key_cache_total", 3, model="xgb", version="v1", result="miss"),
            sample("fhe_bento_key_cache_total", 9, model="xgb", version="v1", result="hit"),
            sample("fhe_bento_key_cache_bytes", 400),
            sample("fhe_bento_key_verifications", 2, state="queued"),
            sample("fhe_bento_key_verifications", 1, state="running"),
            sample("fhe_bento_drains_total", 1, outcome="drained"),
        ]
    )
    found = by_dimensions(lines(previous, current))
    assert values(found[(("EndpointName", "model", "version"), ("EndpointName",))]) == {
        "fhe_bento_rows": 5,
        "fhe_bento_fhe_run_seconds_sum": 10.5,
        "fhe_bento_fhe_run_seconds_count": 5,
        "fhe_bento_serving_overhead_seconds_sum": 0,
        "fhe_bento_serving_overhead_seconds_count": 0,
        "fhe_bento_key_cache_misses": 1,
    }
    assert values(found[(("EndpointName",),)]) == {
        "fhe_bento_key_cache_bytes": 400,
        "fhe_bento_key_verifications_queued": 2,
        "fhe_bento_key_verifications_running": 1,
        "fhe_bento_drains": 1,
    }


def test_a_counter_that_restarted_counts_whole():
    previous = dict([sample("fhe_bento_errors_total", 9, code="unknown_key")])
    current = dict([sample("fhe_bento_errors_total", 2, code="unknown_key")])
    [error_line] = [line for line in lines(previous, current) if "code" in line]
    assert values(error_line) == {"fhe_bento_errors": 2}


def test_only_models_and_codes_that_moved_get_a_line_the_instance_one_every_time():
    previous = dict(
        [
            sample("fhe_bento_rows_total", 4, model="xgb", version="v1", outcome="ok"),
            sample("fhe_bento_errors_total", 1, code="unknown_key"),
        ]
    )
    current = {
        **previous,
        **dict(
            [
                sample("fhe_bento_rows_total", 1, model="logreg", version="v7", outcome="ok"),
                sample("fhe_bento_errors_total", 3, code="invalid_key_id"),
            ]
        ),
    }
    found = lines(previous, current)
    assert [(line.get("model"), line.get("version"), line.get("code")) for line in found] == [
        ("logreg", "v7", None),
        (None, None, "invalid_key_id"),
        (None, None, None),
    ]
    assert by_dimensions(found)[(("EndpointName", "code"), ("EndpointName",))]["fhe_bento_errors"] == 3
    assert len(lines(current, current)) == 1  # nothing moved: the instance's line alone


def test_dimension_values_are_ascii_and_never_empty():
    current = dict([sample("fhe_bento_rows_total", 1, model="modèle", version="v1", outcome="ok")])
    [model_line, _] = lines({}, current)
    assert model_line["model"] == "mod\\xe8le"
    assert json.loads(emf.emf_lines({}, {}, "", WHEN)[0])[ENDPOINT_DIMENSION] == "-"


def test_the_sample_names_are_those_prometheus_client_gives_the_metrics_of_runtime_metrics():
    """The same kinds and names as runtime/metrics.py, in a registry of the test's own: the lines read the
    samples prometheus_client exposes (a counter's `_total`, a histogram's `_sum` and `_count`)."""
    registry = CollectorRegistry()
    rows = Counter("fhe_bento_rows", "", ["model", "version", "outcome"], registry=registry)
    seconds = Histogram("fhe_bento_fhe_run_seconds", "", ["model", "version"], registry=registry)
    overhead = Histogram("fhe_bento_serving_overhead_seconds", "", ["model", "version"], registry=registry)
    cache = Counter("fhe_bento_key_cache", "", ["model", "version", "result"], registry=registry)
    cache_bytes = Gauge("fhe_bento_key_cache_bytes", "", registry=registry)
    errors = Counter("fhe_bento_errors", "", ["code"], registry=registry)
    drains = Counter("fhe_bento_drains", "", ["outcome"], registry=registry)
    Counter("other_total_thing", "", registry=registry).inc()  # not fhe-bento's: ignored
    before = emf.snapshot(registry.collect())
    rows.labels(model="xgb", version="v1", outcome="ok").inc(3)
    for value in (0.5, 1.5, 2.0):
        seconds.labels(model="xgb", version="v1").observe(value)
    overhead.labels(model="xgb", version="v1").observe(0.25)
    cache.labels(model="xgb", version="v1", result="miss").inc()
    cache_bytes.set(4096)
    errors.labels(code="unknown_key").inc(2)
    drains.labels(outcome="timed_out").inc()
    found = by_dimensions(lines(before, emf.snapshot(registry.collect())))
    assert values(found[(("EndpointName", "model", "version"), ("EndpointName",))]) == {
        "fhe_bento_rows": 3,
        "fhe_bento_fhe_run_seconds_sum": 4.0,
        "fhe_bento_fhe_run_seconds_count": 3,
        "fhe_bento_serving_overhead_seconds_sum": 0.25,
        "fhe_bento_serving_overhead_seconds_count": 1,
        "fhe_bento_key_cache_misses": 1,
    }
    assert values(found[(("EndpointName", "code"), ("EndpointName",))]) == {"fhe_bento_errors": 2}
    assert values(found[(("EndpointName",),)])["fhe_bento_key_cache_bytes"] == 4096
    assert values(found[(("EndpointName",),)])["fhe_bento_drains"] == 1


def test_every_dashboard_metric_is_in_the_lines_with_the_endpoint_alone_as_a_dimension_set():
    """The deploy command's dashboard (runtime/cloudwatch.py) reads each metric by EndpointName alone."""
    current = {
        (
            metric.sample,
            tuple(sorted({**dict(XGB), "code": "c", **{k: min(v) for k, v in metric.where.items()}}.items())),
        ): 1.0
        for kind in emf.LINE_KINDS
        for metric in kind.metrics
    }
    by_endpoint_alone = {
        name
        for line in lines({}, current)
        if [ENDPOINT_DIMENSION] in directive(line)["Dimensions"]
        for name in values(line)
    }
    assert by_endpoint_alone == emf.metric_names()
    assert {metric for metric, _, _ in DASHBOARD_METRICS} <= by_endpoint_alone
    assert all(statistic in {"Sum", "Maximum"} for _, statistic, _ in DASHBOARD_METRICS)


class FakeRegistry:
    def __init__(self) -> None:
        self.rows = 0.0

    def collect(self) -> emf.Snapshot:
        return dict([sample("fhe_bento_rows_total", self.rows, model="xgb", version="v1", outcome="ok")])


def test_the_exporter_counts_from_its_start_writes_on_its_timer_and_once_more_when_it_stops():
    registry, written = FakeRegistry(), []
    registry.rows = 5  # counted before this worker started (a worker started again): sent by its predecessor

    def rows_sent() -> float:
        return sum(json.loads(line).get("fhe_bento_rows", 0) for line in written)

    async def scenario() -> None:
        exporter = emf.EmfExporter(0.05, "prod", collect=registry.collect, write=written.append)
        exporter.start()
        registry.rows = 8
        for _ in range(100):
            await asyncio.sleep(0.02)
            if rows_sent() == 3:
                break
        assert rows_sent() == 3
        registry.rows = 9
        exporter.stop()  # the worker stops: its last line goes out at once, and the timer with it
        assert rows_sent() == 4
        count = len(written)
        await asyncio.sleep(0.2)
        assert len(written) == count

    asyncio.run(scenario())


def test_the_exporter_starts_only_in_worker_one_and_only_when_on(monkeypatch):
    from fhe_bento.runtime.settings import Settings

    started = []

    def start(exporter: emf.EmfExporter) -> None:
        started.append(exporter)

    monkeypatch.setattr(emf.EmfExporter, "start", start)
    monkeypatch.setattr(emf.bentoml.server_context, "worker_index", 2)
    assert emf.start_exporter(Settings(emf_seconds=1)) is None
    monkeypatch.setattr(emf.bentoml.server_context, "worker_index", 1)
    assert emf.start_exporter(Settings(emf_seconds=0, endpoint_name="prod")) is None
    exporter = emf.start_exporter(Settings(endpoint_name="prod"))
    assert exporter is not None and started == [exporter]
    assert (exporter.interval, exporter.endpoint) == (60, "prod")
    other = emf.start_exporter(Settings(emf_seconds=1))
    assert other is not None and other.endpoint == emf.LOCAL_ENDPOINT


@pytest.mark.parametrize("kind", emf.LINE_KINDS)
def test_line_kinds_read_fhe_bento_samples(kind):
    assert all(
        metric.sample.startswith(emf.PREFIX) and metric.name.startswith(emf.PREFIX) for metric in kind.metrics
    )
