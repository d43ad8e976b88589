"""Update a deployed endpoint to a new model set, and roll it back (`fhe-bento sagemaker update` and
`rollback`): boto3's SageMaker, Application Auto Scaling and CloudWatch clients, since the sagemaker SDK's
`Session` has no `UpdateEndpoint` with a `DeploymentConfig` (its Model and EndpointConfig helpers are
deploy's, `sagemaker_deploy.create_model_and_config`).

- An update is a generation: a Model and an EndpointConfig both named `<endpoint>-<UTC yyyymmdd-hhmmss>`,
  its model.tar.gz at `s3://BUCKET/PREFIX/<that stamp>/model.tar.gz` (never over an older generation's, which
  a rollback or a new instance of the old fleet still reads). What is not given is kept from the generation
  in service: image, role, instance type and count, async configuration, key store and environment.
- `UpdateEndpoint` runs a blue/green deployment (all at once, or canary / linear traffic shifting) with
  automatic rollback on the two alarms of `sagemaker_monitoring`.
- The EndpointConfig in service before an update is recorded in the endpoint's tag `PREVIOUS_CONFIG_TAG`
  (tags survive the command's process and exist alike on SageMaker and moto; `LastDeploymentConfig` holds the
  deployment policy, not the config). `rollback` deploys it again and records the config it leaves, so a
  second rollback undoes the first. An endpoint holds two generations: the one in service and that
  previous one; an update deletes the one before (or, when SageMaker rolled it back, its own).
- Autoscaling stays registered, except where SageMaker requires it gone: an update that changes the
  instance type deregisters the variant first and registers it again afterwards, with the same bounds
  and policies (`sagemaker_scaling.registration` / `register_again`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from tqdm.auto import tqdm

from fhe_bento.modelkit import sagemaker_scaling
from fhe_bento.modelkit.sagemaker_deploy import KEY_STORE_ENV, MANAGED_ENV, VARIANT, model_data_url

PREVIOUS_CONFIG_TAG = "fhe-bento:previous-endpoint-config"
STAMP_FORMAT = "%Y%m%d-%H%M%S"
NAME_LIMIT = 63  # SageMaker's longest Model / EndpointConfig name
LONGEST_ENDPOINT = NAME_LIMIT - len("-20250101-120000")
NAME_PATTERN = r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$"
IN_PROGRESS = ("Creating", "Updating", "SystemUpdating", "RollingBack")
ROLLBACK_DEPLOYMENT: dict[str, Any] = {
    "BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    }
}  # a rollback returns to a known config: no alarms (one in ALARM would roll the rollback back)


class WaitOptions(BaseModel):
    timeout_seconds: int = Field(default=3600, ge=1)
    poll_seconds: int = Field(default=15, ge=1)


class UpdateOptions(WaitOptions):
    """What the command line asks of an update, checked before any AWS call."""

    endpoint_name: str = Field(max_length=LONGEST_ENDPOINT, pattern=NAME_PATTERN)
    canary_percent: int | None = Field(default=None, ge=1, le=50)  # SageMaker: at most half the fleet
    linear_step_percent: int | None = Field(default=None, ge=10, le=50)  # SageMaker: 10 to 50 %
    wait_seconds: int = Field(default=300, ge=0, le=3600)
    latency_alarm_ms: int | None = Field(default=None, ge=1)
    key_store: str | None = None
    instance_type: str | None = None
    instance_count: int | None = Field(default=None, ge=1)

    @field_validator("key_store")
    @classmethod
    def _shared_keys(cls, url: str | None) -> str | None:
        if url is not None:
            check_shared_key_store(url)
        return url

    @model_validator(mode="after")
    def _one_shift(self) -> UpdateOptions:
        if self.canary_percent is not None and self.linear_step_percent is not None:
            raise ValueError("give --canary-percent or --linear-step-percent, not both")
        return self

    def traffic_routing(self) -> dict[str, Any]:
        """The blue/green traffic shift: all at once (then a baking period of --wait-seconds), a canary, or
        linear steps, --wait-seconds apart."""
        routing: dict[str, Any] = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": self.wait_seconds}
        if self.canary_percent is not None:
            routing |= {
                "Type": "CANARY",
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": self.canary_percent},
            }
        if self.linear_step_percent is not None:
            routing |= {
                "Type": "LINEAR",
                "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": self.linear_step_percent},
            }
        return routing

    def deployment_config(self, alarms: list[str]) -> dict[str, Any]:
        return {
            "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": self.traffic_routing()},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
        }


def check_shared_key_store(url: str) -> None:
    if not url.startswith("s3://"):
        raise ValueError(
            "an update runs the old and the new fleet side by side: their key store must be shared, "
            f"s3://bucket/prefix, not {url}"
        )


def new_generation(
    endpoint_name: str, bucket: str, prefix: str, at: datetime | None = None
) -> tuple[str, str]:
    """An update's name (its Model's and its EndpointConfig's) and the URL of its model.tar.gz."""
    stamp = (at or datetime.now(UTC)).strftime(STAMP_FORMAT)
    return f"{endpoint_name}-{stamp}", model_data_url(bucket, f"{prefix.strip('/')}/{stamp}")


@dataclass(frozen=True)
class Generation:
    """An endpoint as DescribeEndpoint and its config's Model say it is served now."""

    endpoint_arn: str
    status: str
    config_name: str
    previous_config: str | None  # the tag
    image_uri: str
    role_arn: str
    environment: dict[str, str]  # the Model's, without what `create_model_and_config` sets itself
    key_store: str
    instance_type: str
    instance_count: int  # what the variant runs now (autoscaling moves it), at least 1
    async_config: dict[str, Any]  # the EndpointConfig's AsyncInferenceConfig, {} for real time

    def async_fields(self) -> dict[str, Any]:
        """`DeployConfig`'s async fields, as `deploy` set them."""
        output = self.async_config.get("OutputConfig", {})
        return {
            "async_output_path": output.get("S3OutputPath"),
            "async_failure_path": output.get("S3FailurePath"),
            "max_concurrent_invocations": self.async_config.get("ClientConfig", {}).get(
                "MaxConcurrentInvocationsPerInstance"
            ),
        }


def previous_config(sm: Any, endpoint_arn: str) -> str | None:
    tags = sm.list_tags(ResourceArn=endpoint_arn)["Tags"]
    return next((tag["Value"] for tag in tags if tag["Key"] == PREVIOUS_CONFIG_TAG), None)


def record_previous(sm: Any, endpoint_arn: str, config_name: str | None) -> None:
    """Set (or, with None, remove) the tag; removed first, as moto's AddTags appends where SageMaker's
    overwrites."""
    sm.delete_tags(ResourceArn=endpoint_arn, TagKeys=[PREVIOUS_CONFIG_TAG])
    if config_name is not None:
        sm.add_tags(ResourceArn=endpoint_arn, Tags=[{"Key": PREVIOUS_CONFIG_TAG, "Value": config_name}])


def variant_of(config: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in config["ProductionVariants"] if v["VariantName"] == VARIANT)


def current_generation(sm: Any, endpoint_name: str) -> Generation:
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = variant_of(config)
    model = sm.describe_model(ModelName=variant["ModelName"])
    container = model["PrimaryContainer"]
    environment = container.get("Environment", {})
    running: dict[str, Any] = next(
        (v for v in endpoint.get("ProductionVariants", []) if v["VariantName"] == VARIANT), {}
    )
    return Generation(
        endpoint_arn=endpoint["EndpointArn"],
        status=endpoint["EndpointStatus"],
        config_name=endpoint["EndpointConfigName"],
        previous_config=previous_config(sm, endpoint["EndpointArn"]),
        image_uri=container["Image"],
        role_arn=model["ExecutionRoleArn"],
        environment={k: v for k, v in environment.items() if k not in MANAGED_ENV},
        key_store=environment.get(KEY_STORE_ENV, ""),
        instance_type=variant["InstanceType"],
        instance_count=max(1, running.get("CurrentInstanceCount", variant["InitialInstanceCount"])),
        async_config=config.get("AsyncInferenceConfig", {}),
    )


def config_models(sm: Any, config_name: str) -> list[str]:
    """The Models an EndpointConfig serves ([] when it does not exist)."""
    try:
        config = sm.describe_endpoint_config(EndpointConfigName=config_name)
    except sm.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] == "ValidationException":  # SageMaker's "Could not find"
            return []
        raise
    return [variant["ModelName"] for variant in config["ProductionVariants"]]


def held_resources(sm: Any, endpoint_name: str) -> tuple[list[str], list[str]]:
    """The EndpointConfigs an endpoint holds (the one in service and the previous one) and their Models."""
    endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
    configs = [endpoint["EndpointConfigName"]]
    previous = previous_config(sm, endpoint["EndpointArn"])
    if previous not in (None, *configs):
        configs.append(str(previous))
    held = {config: config_models(sm, config) for config in configs}
    return [c for c, models in held.items() if models], [m for models in held.values() for m in models]


def delete_generation(sm: Any, config_name: str, keep: list[str]) -> None:
    """Delete an EndpointConfig no longer held and its Models, except those in the configs `keep`."""
    kept = {model for name in keep for model in config_models(sm, name)}
    models = config_models(sm, config_name)
    if not models:
        return
    sm.delete_endpoint_config(EndpointConfigName=config_name)
    for model in models:
        if model not in kept:
            sm.delete_model(ModelName=model)


def wait_for_deployment(
    sm: Any, endpoint_name: str, poll_seconds: int, timeout_seconds: int, progress: bool = True
) -> dict[str, Any]:
    """Poll DescribeEndpoint until the endpoint is no longer Creating/Updating (or the timeout passes),
    showing its status on one progress line; returns the last description."""
    deadline = time.monotonic() + timeout_seconds

    def line(described: dict[str, Any]) -> str:
        pending = described.get("PendingDeploymentSummary", {}).get("EndpointConfigName")
        return f"endpoint {endpoint_name}: {described['EndpointStatus']}" + (
            f" to {pending}" if pending else ""
        )

    described = sm.describe_endpoint(EndpointName=endpoint_name)
    with tqdm(desc=line(described), bar_format="{desc} [{elapsed}]", disable=not progress) as bar:
        while described["EndpointStatus"] in IN_PROGRESS and time.monotonic() + poll_seconds <= deadline:
            time.sleep(poll_seconds)
            described = sm.describe_endpoint(EndpointName=endpoint_name)
            bar.set_description_str(line(described))
    return described


@dataclass(frozen=True)
class Deployment:
    """How a switch of EndpointConfig ended."""

    described: dict[str, Any]  # the last DescribeEndpoint
    target: str
    reregistered: sagemaker_scaling.Registration | None  # autoscaling deregistered for the switch, if any

    @property
    def status(self) -> str:
        return str(self.described["EndpointStatus"])

    @property
    def succeeded(self) -> bool:
        return self.status == "InService" and self.described["EndpointConfigName"] == self.target

    @property
    def rolled_back(self) -> bool:
        return self.status == "InService" and self.described["EndpointConfigName"] != self.target


def settle(sm: Any, before: Generation, outcome: Deployment) -> None:
    """Keep two generations once an update has ended: in service and previous. After a success the one
    before the previous goes; after SageMaker rolled the update back, the update's own goes and the tag
    names the previous config again. After a timeout or a failure nothing is deleted."""
    if outcome.succeeded and before.previous_config not in (None, before.config_name, outcome.target):
        delete_generation(sm, str(before.previous_config), keep=[before.config_name, outcome.target])
    elif outcome.rolled_back:
        record_previous(sm, before.endpoint_arn, before.previous_config)
        delete_generation(
            sm, outcome.target, keep=[before.config_name, *filter(None, [before.previous_config])]
        )


def switch_config(
    clients: dict[str, Any],
    endpoint_name: str,
    current: Generation,
    target: str,
    target_instance_type: str,
    deployment: dict[str, Any],
    options: WaitOptions,
    echo: Callable[[str], None],
    progress: bool = True,
) -> Deployment:
    """Deploy the EndpointConfig `target` on the endpoint with `deployment` and wait; record the config in
    service before as the previous one. Autoscaling is deregistered around an instance-type change and
    registered again once the endpoint is in service."""
    sm, aas, cloudwatch = clients["sagemaker"], clients["application-autoscaling"], clients["cloudwatch"]
    registered = sagemaker_scaling.registration(aas, endpoint_name)
    reregister = registered if registered and target_instance_type != current.instance_type else None
    if reregister:
        echo(f"instance type {current.instance_type} to {target_instance_type}: autoscaling deregistered")
        sagemaker_scaling.disable(aas, cloudwatch, endpoint_name)
    try:
        sm.update_endpoint(EndpointName=endpoint_name, EndpointConfigName=target, DeploymentConfig=deployment)
    except Exception:
        if reregister:  # nothing changed: the endpoint is in service on its config
            sagemaker_scaling.register_again(aas, cloudwatch, endpoint_name, reregister)
        raise
    record_previous(sm, current.endpoint_arn, current.config_name)
    described = wait_for_deployment(
        sm, endpoint_name, options.poll_seconds, options.timeout_seconds, progress
    )
    if reregister and described["EndpointStatus"] == "InService":
        sagemaker_scaling.register_again(aas, cloudwatch, endpoint_name, reregister)
        echo(f"autoscaling registered again: {reregister.min_capacity}..{reregister.max_capacity} instances")
    return Deployment(described=described, target=target, reregistered=reregister)
