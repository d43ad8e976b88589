"""Autoscaling of an endpoint's variant with Application Auto Scaling and CloudWatch (boto3: the sagemaker
SDK has no API for either).

Targets come from the model's measured FHE seconds per row (`row_seconds`, recorded at import):
- real time: target tracking on `SageMakerVariantInvocationsPerInstance` (per minute), at
  `TARGET_UTILIZATION` of what an instance computes: 60 x parallel rows / (row_seconds x rows per call);
- async: target tracking on `ApproximateBacklogSizePerInstance`, so that the queue holds about
  `QUEUE_SECONDS` of work per instance; and, so that an endpoint scaled to zero wakes up, a step policy
  fired by a CloudWatch alarm on `HasBacklogWithoutCapacity`.

`registration` reads a variant's autoscaling back and `register_again` restores it: `fhe-bento sagemaker
update` deregisters the variant around a change of instance type, as SageMaker requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, model_validator

from fhe_bento.modelkit.sagemaker_deploy import VARIANT

NAMESPACE = "sagemaker"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"
TARGET_UTILIZATION = 0.7
QUEUE_SECONDS = 300.0
COOLDOWN_SECONDS = 300
POLICY_CONFIGURATIONS = ("TargetTrackingScalingPolicyConfiguration", "StepScalingPolicyConfiguration")


class ScalingConfig(BaseModel):
    min_instances: int = Field(ge=0)
    max_instances: int = Field(ge=1)
    asynchronous: bool
    row_seconds: float = Field(gt=0)  # the slowest served model's
    parallel_rows: int = Field(default=1, ge=1)  # rows one instance computes at once (workers x row threads)
    rows_per_call: int = Field(default=8, ge=1)  # rows in one invocation (the client's batch size)

    @model_validator(mode="after")
    def _bounds(self) -> ScalingConfig:
        if self.min_instances > self.max_instances:
            raise ValueError("--min-instances is above --max-instances")
        if self.min_instances == 0 and not self.asynchronous:
            raise ValueError(
                "only an asynchronous endpoint scales to zero: real time needs --min-instances 1"
            )
        return self

    @property
    def call_seconds(self) -> float:
        """What one invocation costs an instance."""
        return self.row_seconds * self.rows_per_call / self.parallel_rows

    def target(self) -> float:
        if self.asynchronous:
            return max(1.0, math.floor(QUEUE_SECONDS / self.call_seconds))
        return round(TARGET_UTILIZATION * 60 / self.call_seconds, 3)


def resource_id(endpoint_name: str) -> str:
    return f"endpoint/{endpoint_name}/variant/{VARIANT}"


def names(endpoint_name: str) -> dict[str, str]:
    return {
        "target_policy": f"{endpoint_name}-target",
        "wake_policy": f"{endpoint_name}-wake-from-zero",
        "wake_alarm": f"{endpoint_name}-backlog-without-capacity",
    }


def scalable_target(endpoint_name: str) -> dict[str, str]:
    """The arguments that name the variant's scalable target in Application Auto Scaling's calls."""
    return {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource_id(endpoint_name),
        "ScalableDimension": DIMENSION,
    }


def enable(aas, cloudwatch, endpoint_name: str, config: ScalingConfig) -> dict:
    """Register the variant as a scalable target with its policies (and the async wake-up alarm)."""
    resource, named = resource_id(endpoint_name), names(endpoint_name)
    scalable = scalable_target(endpoint_name)
    aas.register_scalable_target(
        **scalable, MinCapacity=config.min_instances, MaxCapacity=config.max_instances
    )
    if config.asynchronous:
        metric = {
            "CustomizedMetricSpecification": {
                "MetricName": "ApproximateBacklogSizePerInstance",
                "Namespace": "AWS/SageMaker",
                "Dimensions": [{"Name": "EndpointName", "Value": endpoint_name}],
                "Statistic": "Average",
            }
        }
    else:
        metric = {
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            }
        }
    aas.put_scaling_policy(
        PolicyName=named["target_policy"],
        PolicyType="TargetTrackingScaling",
        **scalable,
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": config.target(),
            **metric,
            "ScaleInCooldown": COOLDOWN_SECONDS,
            "ScaleOutCooldown": COOLDOWN_SECONDS // 5,
        },
    )
    made: dict[str, Any] = {
        "resource_id": resource,
        "target": config.target(),
        "policies": [named["target_policy"]],
    }
    if config.asynchronous and config.min_instances == 0:
        wake = aas.put_scaling_policy(
            PolicyName=named["wake_policy"],
            PolicyType="StepScaling",
            **scalable,
            StepScalingPolicyConfiguration={
                "AdjustmentType": "ChangeInCapacity",
                "Cooldown": COOLDOWN_SECONDS,
                "MetricAggregationType": "Maximum",
                "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
            },
        )
        made["alarm"] = put_wake_alarm(cloudwatch, endpoint_name, wake["PolicyARN"])
        made["policies"].append(named["wake_policy"])
    return made


def put_wake_alarm(cloudwatch, endpoint_name: str, wake_policy_arn: str) -> str:
    """The alarm that fires the wake-up step policy of an async endpoint scaled to zero; returns its name."""
    name = names(endpoint_name)["wake_alarm"]
    cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="AWS/SageMaker",
        MetricName="HasBacklogWithoutCapacity",
        Dimensions=[{"Name": "EndpointName", "Value": endpoint_name}],
        Statistic="Average",
        Period=60,
        EvaluationPeriods=2,
        DatapointsToAlarm=2,
        Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold",
        TreatMissingData="missing",
        AlarmActions=[wake_policy_arn],
    )
    return name


@dataclass(frozen=True)
class Registration:
    """A variant's autoscaling as Application Auto Scaling describes it: enough to register it again after
    SageMaker required it gone (an update that changes the instance type)."""

    min_capacity: int
    max_capacity: int
    policies: tuple[dict[str, Any], ...]  # put_scaling_policy's PolicyName, PolicyType and configuration


def registration(aas, endpoint_name: str) -> Registration | None:
    """The variant's scalable target and policies, or None when it is not registered."""
    scalable = scalable_target(endpoint_name)
    targets = aas.describe_scalable_targets(
        ServiceNamespace=NAMESPACE, ResourceIds=[scalable["ResourceId"]], ScalableDimension=DIMENSION
    )["ScalableTargets"]
    if not targets:
        return None
    policies = aas.describe_scaling_policies(ServiceNamespace=NAMESPACE, ResourceId=scalable["ResourceId"])[
        "ScalingPolicies"
    ]
    return Registration(
        min_capacity=targets[0]["MinCapacity"],
        max_capacity=targets[0]["MaxCapacity"],
        policies=tuple(
            {
                key: policy[key]
                for key in ("PolicyName", "PolicyType", *POLICY_CONFIGURATIONS)
                if key in policy
            }
            for policy in policies
        ),
    )


def register_again(aas, cloudwatch, endpoint_name: str, registered: Registration) -> None:
    """Register the variant with the bounds and policies it had; the wake-up alarm follows its policy's new
    ARN."""
    scalable = scalable_target(endpoint_name)
    aas.register_scalable_target(
        **scalable, MinCapacity=registered.min_capacity, MaxCapacity=registered.max_capacity
    )
    for policy in registered.policies:
        made = aas.put_scaling_policy(**scalable, **policy)
        if policy["PolicyName"] == names(endpoint_name)["wake_policy"]:
            put_wake_alarm(cloudwatch, endpoint_name, made["PolicyARN"])


def disable(aas, cloudwatch, endpoint_name: str) -> None:
    """Remove the policies, the alarm and the scalable target, whichever exist."""
    scalable = scalable_target(endpoint_name)
    named = names(endpoint_name)
    for policy in aas.describe_scaling_policies(
        ServiceNamespace=NAMESPACE, ResourceId=scalable["ResourceId"]
    )["ScalingPolicies"]:
        aas.delete_scaling_policy(PolicyName=policy["PolicyName"], **scalable)
    cloudwatch.delete_alarms(AlarmNames=[named["wake_alarm"]])
    if aas.describe_scalable_targets(
        ServiceNamespace=NAMESPACE, ResourceIds=[scalable["ResourceId"]], ScalableDimension=DIMENSION
    )["ScalableTargets"]:
        aas.deregister_scalable_target(**scalable)
