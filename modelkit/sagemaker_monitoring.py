"""CloudWatch for an endpoint (boto3: the sagemaker SDK has no API for it): the two alarms that roll an
update back (`fhe-bento sagemaker update` names them in its `AutoRollbackConfiguration`) and the
endpoint's dashboard. `deploy` and `update` make them, `delete` removes them.

- `<endpoint>-5xx-errors`: `AWS/SageMaker` `Invocation5XXErrors`, Sum > 0 over one minute;
- `<endpoint>-model-latency`: `AWS/SageMaker` `ModelLatency` (microseconds), p99 over one minute above
  the threshold (`--latency-alarm-ms`, by default half the invocation limit: 30 s real time, 30 min async),
both on the endpoint's variant (dimensions EndpointName + VariantName), a minute without data counting as
OK (an idle endpoint is not failing).

The dashboard (named after the endpoint) shows SageMaker's invocations, 5xx errors, model latency, CPU and
memory, then one widget per `runtime.cloudwatch.DASHBOARD_METRICS` entry: fhe-bento's own metrics, which
the container writes in Embedded Metric Format with the endpoint's name as dimension.
"""

from __future__ import annotations

import json
from typing import Any

from fhe_bento.modelkit.sagemaker_deploy import VARIANT
from fhe_bento.runtime import cloudwatch as fhe_metrics

SAGEMAKER_NAMESPACE = "AWS/SageMaker"
INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"  # CPU, memory and disk of the endpoint's instances
PERIOD_SECONDS = 60
LATENCY_STATISTIC = "p99"
REALTIME_LATENCY_MS = 30_000  # half of a real-time invocation's 60 s
ASYNC_LATENCY_MS = 1_800_000  # half of an async invocation's hour

# (namespace, metric, statistic, title) of the dashboard's SageMaker widgets, per variant
SAGEMAKER_WIDGETS: tuple[tuple[str, str, str, str], ...] = (
    (SAGEMAKER_NAMESPACE, "Invocations", "Sum", "invocations"),
    (SAGEMAKER_NAMESPACE, "Invocation5XXErrors", "Sum", "5xx errors (rolls an update back)"),
    (SAGEMAKER_NAMESPACE, "ModelLatency", LATENCY_STATISTIC, "model latency p99 (microseconds)"),
    (INSTANCE_NAMESPACE, "CPUUtilization", "Average", "CPU % (100 per core)"),
    (INSTANCE_NAMESPACE, "MemoryUtilization", "Average", "memory %"),
)
WIDGET_WIDTH, WIDGET_HEIGHT, WIDGETS_PER_ROW = 8, 6, 3


def default_latency_ms(asynchronous: bool) -> int:
    return ASYNC_LATENCY_MS if asynchronous else REALTIME_LATENCY_MS


def latency_alarm_ms(cloudwatch: Any, endpoint_name: str, asynchronous: bool) -> int:
    """The latency alarm's threshold now (an update keeps what deploy set), else the default."""
    alarms = cloudwatch.describe_alarms(AlarmNames=[alarm_names(endpoint_name)["latency"]])["MetricAlarms"]
    return round(alarms[0]["Threshold"] / 1000) if alarms else default_latency_ms(asynchronous)


def alarm_names(endpoint_name: str) -> dict[str, str]:
    return {"errors": f"{endpoint_name}-5xx-errors", "latency": f"{endpoint_name}-model-latency"}


def variant_dimensions(endpoint_name: str) -> list[dict[str, str]]:
    return [{"Name": "EndpointName", "Value": endpoint_name}, {"Name": "VariantName", "Value": VARIANT}]


def put_rollback_alarms(cloudwatch: Any, endpoint_name: str, latency_ms: int) -> list[str]:
    """Create (or overwrite) the two alarms; returns their names, errors first."""
    named = alarm_names(endpoint_name)
    common = {
        "Namespace": SAGEMAKER_NAMESPACE,
        "Dimensions": variant_dimensions(endpoint_name),
        "Period": PERIOD_SECONDS,
        "EvaluationPeriods": 1,
        "DatapointsToAlarm": 1,
        "ComparisonOperator": "GreaterThanThreshold",
        "TreatMissingData": "notBreaching",
    }
    cloudwatch.put_metric_alarm(
        AlarmName=named["errors"],
        AlarmDescription=f"{endpoint_name}: any 5xx answer; rolls a fhe-bento update back",
        MetricName="Invocation5XXErrors",
        Statistic="Sum",
        Threshold=0,
        **common,
    )
    cloudwatch.put_metric_alarm(
        AlarmName=named["latency"],
        AlarmDescription=f"{endpoint_name}: model latency p99 above {latency_ms} ms; rolls a fhe-bento update back",
        MetricName="ModelLatency",
        ExtendedStatistic=LATENCY_STATISTIC,
        Threshold=latency_ms * 1000,  # ModelLatency is in microseconds
        **common,
    )
    return [named["errors"], named["latency"]]


def dashboard_body(endpoint_name: str, region: str) -> dict[str, Any]:
    variant = ["EndpointName", endpoint_name, "VariantName", VARIANT]
    metrics: list[tuple[list[str], str, str]] = [
        ([namespace, metric, *variant], stat, title) for namespace, metric, stat, title in SAGEMAKER_WIDGETS
    ]
    metrics += [
        ([fhe_metrics.NAMESPACE, metric, fhe_metrics.ENDPOINT_DIMENSION, endpoint_name], stat, title)
        for metric, stat, title in fhe_metrics.DASHBOARD_METRICS
    ]
    widgets = [
        {
            "type": "metric",
            "x": (index % WIDGETS_PER_ROW) * WIDGET_WIDTH,
            "y": (index // WIDGETS_PER_ROW) * WIDGET_HEIGHT,
            "width": WIDGET_WIDTH,
            "height": WIDGET_HEIGHT,
            "properties": {
                "title": title,
                "metrics": [metric],
                "stat": stat,
                "period": PERIOD_SECONDS,
                "region": region,
                "view": "timeSeries",
            },
        }
        for index, (metric, stat, title) in enumerate(metrics)
    ]
    return {"widgets": widgets}


def put_dashboard(cloudwatch: Any, endpoint_name: str) -> str:
    """Create (or overwrite) the endpoint's dashboard; returns its name."""
    body = dashboard_body(endpoint_name, cloudwatch.meta.region_name)
    cloudwatch.put_dashboard(DashboardName=endpoint_name, DashboardBody=json.dumps(body))
    return endpoint_name


def put_monitoring(cloudwatch: Any, endpoint_name: str, latency_ms: int) -> list[str]:
    """The dashboard and the rollback alarms; returns the alarms' names."""
    put_dashboard(cloudwatch, endpoint_name)
    return put_rollback_alarms(cloudwatch, endpoint_name, latency_ms)


def delete_monitoring(cloudwatch: Any, endpoint_name: str) -> None:
    """Remove the alarms and the dashboard, whichever exist."""
    cloudwatch.delete_alarms(AlarmNames=list(alarm_names(endpoint_name).values()))
    listed = cloudwatch.list_dashboards(DashboardNamePrefix=endpoint_name)["DashboardEntries"]
    if any(entry["DashboardName"] == endpoint_name for entry in listed):
        cloudwatch.delete_dashboards(DashboardNames=[endpoint_name])
