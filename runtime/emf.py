"""fhe-bento's metrics as CloudWatch Embedded Metric Format (EMF) lines on stdout.

SageMaker ships a container's stdout to CloudWatch Logs, which turns every EMF line (a JSON object whose
`_aws.CloudWatchMetrics` names its metrics, namespace and dimensions) into metrics: no agent, no API call.
The lines are read from the same Prometheus samples that `/metrics` serves (`runtime/metrics.py`, in
BentoML's multiprocess registry, which the engine processes write to as well), so the two never disagree:

- one line per (model, version) that had activity since the last line (`MODEL_LINE`): its rows, FHE
  seconds, serving overhead and cold key loads;
- one line per error code that was answered since the last line (`ERROR_LINE`);
- one line for the instance at every interval (`INSTANCE_LINE`): warm-key cache bytes, key verifications
  queued and running, drains.

A counter is sent as its increase since the previous line (CloudWatch sums them over a period), a histogram
as the increase of its `_sum` and `_count`, a gauge as its current value. Every line has the dimension set
(EndpointName, its own labels) and (EndpointName) alone, so a dashboard of the endpoint sums or takes the
maximum over models, versions and instances (`runtime/cloudwatch.DASHBOARD_METRICS`).

`EmfExporter` writes them on a timer, in one worker per instance (BentoML's worker 1), and once more when
that worker stops. The lines are built with `aws-embedded-metrics` (its `MetricsContext` and
`LogSerializer`); its environment detection, which probes EC2's metadata service, is not used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import bentoml
from aws_embedded_metrics.logger.metrics_context import MetricsContext
from aws_embedded_metrics.serializers.log_serializer import LogSerializer

from fhe_bento.runtime.cloudwatch import ENDPOINT_DIMENSION, NAMESPACE
from fhe_bento.runtime.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("bentoml.fhe_bento.emf")
PREFIX = "fhe_bento_"
LOCAL_ENDPOINT = "local"  # the EndpointName of lines turned on without FHE_BENTO_ENDPOINT_NAME

Labels = tuple[tuple[str, str], ...]
# (Prometheus sample name, its labels sorted) -> value: what /metrics shows at one moment
Snapshot = dict[tuple[str, Labels], float]


@dataclass(frozen=True)
class EmfMetric:
    """One metric of an EMF line, read from the Prometheus samples named `sample`."""

    name: str  # in CloudWatch
    sample: str  # as /metrics shows it
    unit: str  # a CloudWatch unit
    counter: bool  # True: the increase since the previous line; False: the current value (a gauge)
    where: Mapping[str, frozenset[str]] = field(default_factory=dict)  # only samples with these label values


@dataclass(frozen=True)
class LineKind:
    """Lines of one kind: one per value of the labels `by` (its dimensions besides the endpoint's)."""

    by: tuple[str, ...]
    metrics: tuple[EmfMetric, ...]
    always: bool  # a line at every interval; else only when one of its counters moved


MODEL_LINE = LineKind(
    by=("model", "version"),
    metrics=(
        EmfMetric(
            "fhe_bento_rows", "fhe_bento_rows_total", "Count", True, {"outcome": frozenset({"ok", "error"})}
        ),
        EmfMetric("fhe_bento_fhe_run_seconds_sum", "fhe_bento_fhe_run_seconds_sum", "Seconds", True),
        EmfMetric("fhe_bento_fhe_run_seconds_count", "fhe_bento_fhe_run_seconds_count", "Count", True),
        EmfMetric(
            "fhe_bento_serving_overhead_seconds_sum",
            "fhe_bento_serving_overhead_seconds_sum",
            "Seconds",
            True,
        ),
        EmfMetric(
            "fhe_bento_serving_overhead_seconds_count",
            "fhe_bento_serving_overhead_seconds_count",
            "Count",
            True,
        ),
        EmfMetric(
            "fhe_bento_key_cache_misses",
            "fhe_bento_key_cache_total",
            "Count",
            True,
            {"result": frozenset({"miss"})},
        ),
    ),
    always=False,
)
ERROR_LINE = LineKind(
    by=("code",),
    metrics=(EmfMetric("fhe_bento_errors", "fhe_bento_errors_total", "Count", True),),
    always=False,
)
INSTANCE_LINE = LineKind(
    by=(),
    metrics=(
        EmfMetric("fhe_bento_key_cache_bytes", "fhe_bento_key_cache_bytes", "Bytes", False),
        EmfMetric(
            "fhe_bento_key_verifications_queued",
            "fhe_bento_key_verifications",
            "Count",
            False,
            {"state": frozenset({"queued"})},
        ),
        EmfMetric(
            "fhe_bento_key_verifications_running",
            "fhe_bento_key_verifications",
            "Count",
            False,
            {"state": frozenset({"running"})},
        ),
        EmfMetric("fhe_bento_drains", "fhe_bento_drains_total", "Count", True),
    ),
    always=True,
)
LINE_KINDS = (MODEL_LINE, ERROR_LINE, INSTANCE_LINE)


def metric_names() -> set[str]:
    """Every metric name the EMF lines carry."""
    return {metric.name for kind in LINE_KINDS for metric in kind.metrics}


def snapshot(families: Iterable[Metric]) -> Snapshot:
    """The samples of fhe-bento's metrics among `families` (a registry's collection)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in families
        if family.name.startswith(PREFIX)
        for sample in family.samples
    }


def collect() -> Snapshot:
    """This instance's fhe-bento samples, as `/metrics` serves them: BentoML's multiprocess registry (every
    worker and engine process of the server) when it runs one, else this process's registry."""
    import prometheus_client  # imported once BentoML has set PROMETHEUS_MULTIPROC_DIR
    from prometheus_client import multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return snapshot(prometheus_client.REGISTRY.collect())
    registry = prometheus_client.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return snapshot(registry.collect())


def _dimension(value: str) -> str:
    """A label value as a CloudWatch dimension value: ASCII, not empty, at most 1024 characters."""
    return (value.encode("ascii", "backslashreplace").decode() or "-")[:1024]


def _matches(labels: Labels, metric: EmfMetric, group: Labels) -> bool:
    held = dict(labels)
    return all(held.get(name) == value for name, value in group) and all(
        held.get(name) in values for name, values in metric.where.items()
    )


def _value(metric: EmfMetric, group: Labels, previous: Snapshot, current: Snapshot) -> float:
    total = 0.0
    for (name, labels), now in current.items():
        if name != metric.sample or not _matches(labels, metric, group):
            continue
        before = previous.get((name, labels), 0.0) if metric.counter else 0.0
        total += now - before if now >= before else now  # a counter that restarted: all of it is new
    return total


def _groups(kind: LineKind, current: Snapshot) -> list[Labels]:
    """The values of `kind.by` that the samples of its metrics carry, sorted."""
    samples = {metric.sample for metric in kind.metrics}
    found = set()
    for name, labels in current:
        held = dict(labels)
        if name in samples and all(label in held for label in kind.by):
            found.add(tuple((label, held[label]) for label in kind.by))
    return sorted(found)


def emf_lines(previous: Snapshot, current: Snapshot, endpoint: str, timestamp: datetime) -> list[str]:
    """The EMF lines (JSON, one object each) for the change from `previous` to `current`."""
    lines = []
    for kind in LINE_KINDS:
        for group in _groups(kind, current) if kind.by else [()]:
            values = [(metric, _value(metric, group, previous, current)) for metric in kind.metrics]
            if not kind.always and not any(metric.counter and value for metric, value in values):
                continue
            context = MetricsContext(namespace=NAMESPACE)
            own = {ENDPOINT_DIMENSION: _dimension(endpoint), **{k: _dimension(v) for k, v in group}}
            context.set_dimensions(
                [own, {ENDPOINT_DIMENSION: own[ENDPOINT_DIMENSION]}] if group else [own], use_default=False
            )
            context.set_timestamp(timestamp)
            for metric, value in values:
                context.put_metric(metric.name, value, metric.unit)
            lines.extend(LogSerializer.serialize(context))
    return lines


def write_stdout(line: str) -> None:
    """One line on stdout at once (SageMaker makes each stdout line a CloudWatch Logs event)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class EmfExporter:
    """Writes the EMF lines of this instance every `interval` seconds, on the running event loop."""

    def __init__(
        self,
        interval: float,
        endpoint: str,
        collect: Callable[[], Snapshot] = collect,
        write: Callable[[str], None] = write_stdout,
    ) -> None:
        self.interval = interval
        self.endpoint = endpoint
        self._collect = collect
        self._write = write
        # What the previous line counted. Taken at start, so that a worker started again (BentoML respawns a
        # dead one outside a container) does not send again what its predecessor sent.
        self.previous: Snapshot = {}
        self._task: asyncio.Task[None] | None = None

    def _send(self, current: Snapshot, taken: datetime) -> None:
        for line in emf_lines(self.previous, current, self.endpoint, taken):
            self._write(line)
        self.previous = current

    def flush(self) -> None:
        """Write the lines for everything since the previous ones, now."""
        taken = datetime.now(UTC)
        self._send(self._collect(), taken)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            taken = datetime.now(UTC)
            try:
                # Reading every process's files is the registry's I/O: off the event loop. The lines are
                # written here, so a stop() that cancels this never races a half-sent interval.
                current = await asyncio.to_thread(self._collect)
                self._send(current, taken)
            except Exception:  # the metrics must never stop the worker
                log.exception("EMF lines not written this time")

    def start(self) -> None:
        self.previous = self._collect()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fhe-bento-emf")

    def stop(self) -> None:
        """The worker stops (after its drain): a last line, so that what the last interval counted, the
        drain included, is sent."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            self.flush()
        except Exception:
            log.exception("the last EMF lines not written")


def start_exporter(settings: Settings) -> EmfExporter | None:
    """The instance's exporter, started, in BentoML's worker 1 (the one worker of a server that is not
    `bentoml serve`'d, whose index is None) when `settings.emf_interval()` is not 0; else None."""
    interval = settings.emf_interval()
    if not interval or bentoml.server_context.worker_index not in (None, 1):
        return None
    exporter = EmfExporter(interval, settings.endpoint_name or LOCAL_ENDPOINT)
    exporter.start()
    log.info(
        "EMF metrics every %d s on stdout (namespace %s, %s=%s)",
        interval,
        NAMESPACE,
        ENDPOINT_DIMENSION,
        exporter.endpoint,
    )
    return exporter
