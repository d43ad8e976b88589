"""`fhe-bento sagemaker update` and `rollback` against moto's server mode, extended with SageMaker's
UpdateEndpoint (harness/moto_sagemaker_update.py). The calls the commands make are read from moto's own
request recorder, as they reached the server."""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import httpx
import pytest
from click.testing import CliRunner
from conftest import LOGREG, XGB
from test_aws import ROLE, cli, deploy_args

from fhe_bento.modelkit.cli import main
from fhe_bento.runtime.cloudwatch import DASHBOARD_METRICS

IMAGE_1 = "123456789012.dkr.ecr.us-east-1.amazonaws.com/fhe-bento:1"  # test_aws.deploy_args's
IMAGE_2 = "123456789012.dkr.ecr.us-east-1.amazonaws.com/fhe-bento:2"
GENERATION = r"-\d{8}-\d{6}"
ALL_AT_ONCE = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 300}
ROLLBACK = {
    "BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    }
}
PREVIOUS_TAG = "fhe-bento:previous-endpoint-config"


@pytest.fixture(scope="module")
def bucket(moto_url) -> str:
    boto3.client("s3").create_bucket(Bucket="fhe-bento-update")
    return "fhe-bento-update"


@contextmanager
def recorded(moto_url: str) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The JSON-protocol calls (SageMaker, Application Auto Scaling) that reach moto inside the block, in
    order, as (X-Amz-Target, body); `calls` is filled when the block ends."""
    calls: list[tuple[str, dict[str, Any]]] = []
    httpx.post(f"{moto_url}/moto-api/recorder/reset-recording").raise_for_status()
    httpx.post(f"{moto_url}/moto-api/recorder/start-recording").raise_for_status()
    try:
        yield calls
    finally:
        httpx.post(f"{moto_url}/moto-api/recorder/stop-recording").raise_for_status()
        log = httpx.get(f"{moto_url}/moto-api/recorder/download-recording").text
    for line in filter(None, log.splitlines()):
        entry = json.loads(line)
        target = {k.lower(): v for k, v in entry["headers"].items()}.get("x-amz-target")
        body = base64.b64decode(entry["body"]) if entry["body_encoded"] else entry["body"]
        calls.append((target or f"{entry['method']} {entry['url']}", json.loads(body) if target else {}))


def actions(calls: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The calls' action names (`SageMaker.UpdateEndpoint` -> `UpdateEndpoint`), S3 and CloudWatch left out."""
    return [target.split(".", 1)[1] for target, _ in calls if target.startswith(("SageMaker.", "AnyScale"))]


def body_of(calls: list[tuple[str, dict[str, Any]]], action: str) -> list[dict[str, Any]]:
    return [body for target, body in calls if target.endswith(f".{action}")]


def update_args(name: str, bucket: str, *extra: str, models: str = f"{XGB}:latest") -> list[str]:
    return [
        "sagemaker",
        "update",
        "--endpoint-name",
        name,
        "--bucket",
        bucket,
        "--prefix",
        name,
        "--models",
        models,
        "--poll-seconds",
        "1",
        *extra,
    ]


def tags(endpoint_name: str) -> dict[str, str]:
    sm = boto3.client("sagemaker")
    arn = sm.describe_endpoint(EndpointName=endpoint_name)["EndpointArn"]
    return {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=arn)["Tags"]}


def scaling(endpoint_name: str) -> tuple[tuple[int, int], dict[str, Any]]:
    """The variant's autoscaling bounds and its policies' configurations by name."""
    aas, resource = boto3.client("application-autoscaling"), f"endpoint/{endpoint_name}/variant/AllTraffic"
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])[
        "ScalableTargets"
    ]
    policies = aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)[
        "ScalingPolicies"
    ]
    return (target["MinCapacity"], target["MaxCapacity"]), {
        p["PolicyName"]: (p["PolicyType"], p["TargetTrackingScalingPolicyConfiguration"]) for p in policies
    }


def assert_alarms_and_dashboard(name: str, latency_ms: int) -> None:
    cloudwatch = boto3.client("cloudwatch")
    alarms = {
        a["AlarmName"]: a
        for a in cloudwatch.describe_alarms(AlarmNames=[f"{name}-5xx-errors", f"{name}-model-latency"])[
            "MetricAlarms"
        ]
    }
    dimensions = [{"Name": "EndpointName", "Value": name}, {"Name": "VariantName", "Value": "AllTraffic"}]
    common = ("AWS/SageMaker", dimensions, 60, 1, 1, "GreaterThanThreshold", "notBreaching")
    assert {
        alarm_name: (
            a["MetricName"],
            a.get("Statistic") or a.get("ExtendedStatistic"),
            a["Threshold"],
            (
                a["Namespace"],
                a["Dimensions"],
                a["Period"],
                a["EvaluationPeriods"],
                a["DatapointsToAlarm"],
                a["ComparisonOperator"],
                a["TreatMissingData"],
            ),
        )
        for alarm_name, a in alarms.items()
    } == {
        f"{name}-5xx-errors": ("Invocation5XXErrors", "Sum", 0.0, common),
        f"{name}-model-latency": ("ModelLatency", "p99", latency_ms * 1000.0, common),
    }
    body = json.loads(cloudwatch.get_dashboard(DashboardName=name)["DashboardBody"])
    widgets = [(w["properties"]["metrics"], w["properties"]["stat"]) for w in body["widgets"]]
    variant = ["EndpointName", name, "VariantName", "AllTraffic"]
    assert widgets == [
        ([["AWS/SageMaker", "Invocations", *variant]], "Sum"),
        ([["AWS/SageMaker", "Invocation5XXErrors", *variant]], "Sum"),
        ([["AWS/SageMaker", "ModelLatency", *variant]], "p99"),
        ([["/aws/sagemaker/Endpoints", "CPUUtilization", *variant]], "Average"),
        ([["/aws/sagemaker/Endpoints", "MemoryUtilization", *variant]], "Average"),
    ] + [([["fhe-bento", metric, "EndpointName", name]], stat) for metric, stat, _ in DASHBOARD_METRICS]
    assert {w["properties"]["region"] for w in body["widgets"]} == {"us-east-1"}


def assert_generation(
    name: str,
    generation: str,
    bucket: str,
    image: str,
    instance_type: str,
    instance_count: int,
    env: dict[str, str],
    models: list[str],
) -> None:
    """An update's Model and EndpointConfig, and the model.tar.gz of its own."""
    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    stamp = generation.removeprefix(f"{name}-")
    model = sm.describe_model(ModelName=generation)
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"] == {
        "Image": image,
        "ModelDataUrl": f"s3://{bucket}/{name}/{stamp}/model.tar.gz",
        "Environment": {
            "FHE_BENTO_MODEL_DIR": "/opt/ml/model",
            "PORT": "8080",
            "FHE_BENTO_KEY_STORE": f"s3://{bucket}/{name}/keys",  # deploy's store: keys stay registered
            "FHE_BENTO_ENDPOINT_NAME": name,
            **env,
        },
    }
    (variant,) = sm.describe_endpoint_config(EndpointConfigName=generation)["ProductionVariants"]
    assert (
        variant["VariantName"],
        variant["ModelName"],
        variant["InstanceType"],
        variant["InitialInstanceCount"],
    ) == (
        "AllTraffic",
        generation,
        instance_type,
        instance_count,
    )
    archive = s3.get_object(Bucket=bucket, Key=f"{name}/{stamp}/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert sorted({n.split("/")[0] for n in tar.getnames()}) == sorted(models)


def test_update_then_rollback_keeps_the_previous_config_autoscaling_and_keys(demo, bucket, moto_url):
    name = "fhe-up"
    sm = boto3.client("sagemaker")
    cli(
        *deploy_args(
            name, bucket, "--instance-type", "ml.c5.xlarge", "--min-instances", "1", "--max-instances", "3"
        )
    )
    assert_alarms_and_dashboard(name, 30_000)  # deploy makes them too
    bounds, policies = scaling(name)
    assert bounds == (1, 3) and list(policies) == [f"{name}-target"]

    with recorded(moto_url) as calls:
        run = CliRunner().invoke(
            main,
            update_args(
                name,
                bucket,
                "--image-uri",
                IMAGE_2,
                "--env",
                "FHE_BENTO_WORKERS=2",
                models=f"{XGB}:latest,{LOGREG}:latest",
            ),
        )
    assert run.exit_code == 0, (run.output, run.exception)
    done = run.stdout
    endpoint = sm.describe_endpoint(EndpointName=name)
    new = endpoint["EndpointConfigName"]
    assert re.fullmatch(name + GENERATION, new) and endpoint["EndpointStatus"] == "InService"
    # the progress line (stderr) showed the endpoint Updating to the new config, then InService
    shown = [re.sub(r" \[.*", "", line, flags=re.S) for line in run.stderr.split("\r") if line.strip()]
    assert list(dict.fromkeys(shown)) == [
        f"endpoint {name}: Updating to {new}",
        f"endpoint {name}: InService",
    ]
    assert (
        f"endpoint {name} is InService on {new}; `fhe-bento sagemaker rollback --endpoint-name {name}`"
        in done
    )
    assert body_of(calls, "UpdateEndpoint") == [
        {
            "EndpointName": name,
            "EndpointConfigName": new,
            "DeploymentConfig": {
                "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": ALL_AT_ONCE},
                "AutoRollbackConfiguration": {
                    "Alarms": [{"AlarmName": f"{name}-5xx-errors"}, {"AlarmName": f"{name}-model-latency"}]
                },
            },
        }
    ]
    # read the endpoint, create the generation, update, then poll: Updating once, then InService
    assert actions(calls) == [
        "DescribeEndpoint",
        "DescribeEndpointConfig",
        "DescribeModel",
        "ListTags",
        "CreateModel",
        "CreateEndpointConfig",
        "DescribeScalableTargets",
        "DescribeScalingPolicies",
        "UpdateEndpoint",
        "DeleteTags",
        "AddTags",
        "DescribeEndpoint",
        "DescribeEndpoint",
    ]

    assert_generation(
        name, new, bucket, IMAGE_2, "ml.c5.xlarge", 1, {"FHE_BENTO_WORKERS": "2"}, [XGB, LOGREG]
    )
    old_archive = boto3.client("s3").get_object(Bucket=bucket, Key=f"{name}/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(old_archive), mode="r:gz") as tar:  # the old fleet's, untouched
        assert {n.split("/")[0] for n in tar.getnames()} == {XGB}

    # the previous generation is kept and recorded; autoscaling was never deregistered
    assert sm.describe_endpoint_config(EndpointConfigName=f"{name}-config")["ProductionVariants"][0][
        "ModelName"
    ] == (f"{name}-model")
    assert sm.describe_model(ModelName=f"{name}-model")["PrimaryContainer"]["Image"].endswith("/fhe-bento:1")
    assert tags(name) == {PREVIOUS_TAG: f"{name}-config"}
    assert scaling(name) == (bounds, policies)
    assert_alarms_and_dashboard(name, 30_000)

    with recorded(moto_url) as calls:
        done = cli("sagemaker", "rollback", "--endpoint-name", name, "--poll-seconds", "1")
    assert body_of(calls, "UpdateEndpoint") == [
        {"EndpointName": name, "EndpointConfigName": f"{name}-config", "DeploymentConfig": ROLLBACK}
    ]
    assert "DeregisterScalableTarget" not in actions(calls)
    endpoint = sm.describe_endpoint(EndpointName=name)
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", f"{name}-config")
    assert f"endpoint {name} is InService on {name}-config" in done
    assert tags(name) == {PREVIOUS_TAG: new}  # a second rollback undoes the first
    assert scaling(name) == (bounds, policies)

    done = cli("sagemaker", "delete", "--endpoint-name", name)
    assert done == f"deleted {name} ({name}-config, {new}; {name}-model, {new})\n"
    for config in (f"{name}-config", new):
        with pytest.raises(sm.exceptions.ClientError):
            sm.describe_endpoint_config(EndpointConfigName=config)
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_model(ModelName=new)
    cloudwatch = boto3.client("cloudwatch")
    assert cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"] == []
    assert cloudwatch.list_dashboards(DashboardNamePrefix=name)["DashboardEntries"] == []


def test_an_instance_type_change_registers_autoscaling_again(demo, bucket, moto_url):
    name = "fhe-up-type"
    sm = boto3.client("sagemaker")
    cli(
        *deploy_args(
            name, bucket, "--instance-type", "ml.c5.xlarge", "--min-instances", "1", "--max-instances", "2"
        )
    )
    before = scaling(name)
    resource = {
        "ServiceNamespace": "sagemaker",
        "ResourceId": f"endpoint/{name}/variant/AllTraffic",
        "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
    }

    with recorded(moto_url) as calls:
        done = cli(
            *update_args(
                name,
                bucket,
                "--instance-type",
                "ml.c5.2xlarge",
                "--instance-count",
                "2",
                "--canary-percent",
                "20",
                "--wait-seconds",
                "60",
                "--latency-alarm-ms",
                "20000",
            )
        )
    new = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
    assert re.fullmatch(name + GENERATION, new)
    assert (
        "instance type ml.c5.xlarge to ml.c5.2xlarge: autoscaling deregistered\n" in done
        and "autoscaling registered again: 1..2 instances\n" in done
    )
    (update,) = body_of(calls, "UpdateEndpoint")
    assert update["DeploymentConfig"]["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {
            "Type": "CANARY",
            "WaitIntervalInSeconds": 60,
            "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20},
        }
    }
    # deregistered before the update, registered again with the same bounds and policy once in service
    order = actions(calls)
    assert order[order.index("DeleteScalingPolicy") :] == [
        "DeleteScalingPolicy",
        "DescribeScalableTargets",
        "DeregisterScalableTarget",
        "UpdateEndpoint",
        "DeleteTags",
        "AddTags",
        "DescribeEndpoint",
        "DescribeEndpoint",
        "RegisterScalableTarget",
        "PutScalingPolicy",
    ]
    assert body_of(calls, "RegisterScalableTarget") == [{**resource, "MinCapacity": 1, "MaxCapacity": 2}]
    (policy_name, (policy_type, configuration)) = before[1].popitem()
    assert body_of(calls, "PutScalingPolicy") == [
        {
            **resource,
            "PolicyName": policy_name,
            "PolicyType": policy_type,
            "TargetTrackingScalingPolicyConfiguration": configuration,
        }
    ]
    assert scaling(name) == (before[0], {policy_name: (policy_type, configuration)})
    assert_generation(name, new, bucket, IMAGE_1, "ml.c5.2xlarge", 2, {}, [XGB])
    assert_alarms_and_dashboard(name, 20_000)

    # SageMaker (and the extended moto) refuses a type change while the variant is a scalable target
    with pytest.raises(sm.exceptions.ClientError, match="registered with Application Auto Scaling"):
        sm.update_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")

    with recorded(moto_url) as calls:  # the rollback changes the type back: the same dance
        cli("sagemaker", "rollback", "--endpoint-name", name, "--poll-seconds", "1")
    order = actions(calls)
    assert (
        order.index("DeregisterScalableTarget")
        < order.index("UpdateEndpoint")
        < order.index("RegisterScalableTarget")
    )
    assert sm.describe_endpoint(EndpointName=name)["EndpointConfigName"] == f"{name}-config"
    assert scaling(name) == (before[0], {policy_name: (policy_type, configuration)})
    cli("sagemaker", "delete", "--endpoint-name", name)


def test_an_async_endpoint_keeps_its_async_config_and_its_wake_from_zero_alarm(demo, bucket, moto_url):
    name = "fhe-up-async"
    sm, cloudwatch = boto3.client("sagemaker"), boto3.client("cloudwatch")
    asynchronous = ["--async-output", f"s3://{bucket}/out", "--async-failure", f"s3://{bucket}/failed"]
    cli(*deploy_args(name, bucket, *asynchronous, "--min-instances", "0", "--max-instances", "2"))
    async_config = sm.describe_endpoint_config(EndpointConfigName=f"{name}-config")["AsyncInferenceConfig"]
    (wake_before,) = cloudwatch.describe_alarms(AlarmNames=[f"{name}-backlog-without-capacity"])[
        "MetricAlarms"
    ]

    cli(*update_args(name, bucket, "--instance-type", "ml.c5.2xlarge"))
    new = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
    assert re.fullmatch(name + GENERATION, new)
    assert (
        sm.describe_endpoint_config(EndpointConfigName=new)["AsyncInferenceConfig"]
        == async_config
        == {"OutputConfig": {"S3OutputPath": f"s3://{bucket}/out", "S3FailurePath": f"s3://{bucket}/failed"}}
    )
    assert_generation(name, new, bucket, IMAGE_1, "ml.c5.2xlarge", 1, {}, [XGB])
    assert_alarms_and_dashboard(name, 1_800_000)  # async: half an hour
    # registered again: the wake-up alarm fires the wake policy as it is now (a new ARN)
    aas, resource = boto3.client("application-autoscaling"), f"endpoint/{name}/variant/AllTraffic"
    policies = {
        p["PolicyName"]: p
        for p in aas.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)[
            "ScalingPolicies"
        ]
    }
    assert set(policies) == {f"{name}-target", f"{name}-wake-from-zero"}
    (wake,) = cloudwatch.describe_alarms(AlarmNames=[f"{name}-backlog-without-capacity"])["MetricAlarms"]
    assert (
        wake["AlarmActions"]
        == [policies[f"{name}-wake-from-zero"]["PolicyARN"]]
        != wake_before["AlarmActions"]
    )
    (target,) = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])[
        "ScalableTargets"
    ]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)
    cli("sagemaker", "delete", "--endpoint-name", name)
    assert cloudwatch.describe_alarms(AlarmNamePrefix=name)["MetricAlarms"] == []


def test_an_alarm_in_alarm_rolls_the_update_back(demo, bucket, moto_url):
    name = "fhe-up-alarm"
    sm, cloudwatch = boto3.client("sagemaker"), boto3.client("cloudwatch")
    cli(*deploy_args(name, bucket, "--wait"))
    cloudwatch.set_alarm_state(AlarmName=f"{name}-5xx-errors", StateValue="ALARM", StateReason="test: 5xx")

    with recorded(moto_url) as calls:
        error = cli(*update_args(name, bucket, "--linear-step-percent", "25"), ok=False)
    (update,) = body_of(calls, "UpdateEndpoint")
    new = update["EndpointConfigName"]
    assert re.fullmatch(name + GENERATION, new)
    assert update["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "LINEAR",
        "WaitIntervalInSeconds": 300,
        "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25},
    }
    reason = (
        f"Rolled back to {name}-config from {new}: alarm {name}-5xx-errors in ALARM during the deployment."
    )
    endpoint = sm.describe_endpoint(EndpointName=name)
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"], endpoint["FailureReason"]) == (
        "InService",
        f"{name}-config",
        reason,
    )
    assert endpoint["LastDeploymentConfig"] == update["DeploymentConfig"]
    assert (
        f"Error: SageMaker rolled the deployment back: endpoint {name} is InService on {name}-config ({reason})"
        in error
    )
    # the rolled-back generation is gone, the one in service kept, and nothing recorded to roll back to
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_endpoint_config(EndpointConfigName=new)
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_model(ModelName=new)
    assert sm.describe_model(ModelName=f"{name}-model")["ModelName"] == f"{name}-model"
    assert tags(name) == {}
    (alarm,) = cloudwatch.describe_alarms(AlarmNames=[f"{name}-5xx-errors"])["MetricAlarms"]
    assert alarm["StateValue"] == "ALARM"  # re-put by update, its state kept as CloudWatch keeps it

    error = cli("sagemaker", "rollback", "--endpoint-name", name, ok=False)
    assert f"endpoint {name} has no previous EndpointConfig to return to (it is on {name}-config)" in error
    cli("sagemaker", "delete", "--endpoint-name", name)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--canary-percent", "0"], "canary_percent\n  Input should be greater than or equal to 1"),
        (["--canary-percent", "60"], "canary_percent\n  Input should be less than or equal to 50"),
        (
            ["--linear-step-percent", "5"],
            "linear_step_percent\n  Input should be greater than or equal to 10",
        ),
        (
            ["--canary-percent", "10", "--linear-step-percent", "20"],
            "give --canary-percent or --linear-step-percent",
        ),
        (["--wait-seconds", "3601"], "wait_seconds\n  Input should be less than or equal to 3600"),
        (
            ["--key-store", "file:///var/keys"],
            "their key store must be shared, s3://bucket/prefix, not file:///var/keys",
        ),
        (["--instance-count", "0"], "instance_count\n  Input should be greater than or equal to 1"),
        (["--env", "FHE_BENTO_WORKERS"], "--env takes NAME=VALUE, not 'FHE_BENTO_WORKERS'"),
        (["--push-image", "localhost/fhe-bento:2"], "--push-image needs --ecr-repository"),
        (
            ["--image-uri", IMAGE_2, "--push-image", "x", "--ecr-repository", "r"],
            "--image-uri or --push-image, not",
        ),
        (["--models", "no-such-model:latest"], "the models do not load: "),
        (["--latency-alarm-ms", "0"], "Invalid value for '--latency-alarm-ms': 0 is not in the range x>=1."),
    ],
)
def test_update_options_are_checked_before_any_aws_call(extra, message, demo, bucket, moto_url):
    name = "fhe-never-deployed"
    args = update_args(name, bucket)
    if "--models" in extra:  # replaces update_args' own
        args = args[: args.index("--models")] + args[args.index("--models") + 2 :]
    with recorded(moto_url) as calls:
        error = cli(*args, *extra, ok=False)
    assert message in error
    assert calls == []  # not even a read reached AWS


def test_an_endpoint_name_too_long_for_a_generation_is_refused(demo, bucket, moto_url, tmp_path):
    with recorded(moto_url) as calls:
        long_name = cli(*update_args("e" * 48, bucket), ok=False)
        no_models = cli(*update_args("fhe-never", bucket), "--model-dir", str(tmp_path), ok=False)
    assert "endpoint_name\n  String should have at most 47 characters" in long_name
    assert f"no model folders in {tmp_path}" in no_models
    assert calls == []
