"""moto's server with SageMaker's `UpdateEndpoint` added: the test double for `fhe-bento sagemaker update`
and `rollback` (`harness.devserver.MotoServer` always starts moto through it).

moto 5.2.6 answers `UpdateEndpoint` with "not implemented", and its endpoints never pass through
`Updating`. This entry point adds the action to moto's SageMaker classes in its own process (a monkeypatch
of moto's `SageMakerResponse` and `SageMakerModelBackend`: nothing outside this process changes), then
runs moto's own server with the same arguments:

    python -m harness.moto_sagemaker_update -H 127.0.0.1 -p PORT

What the added action does, as close to SageMaker as botocore's model of `DescribeEndpoint` lets it show:
- it refuses (ValidationException) an unknown endpoint or endpoint config, an endpoint that is not
  `InService`, and a change of instance type on a variant registered as a scalable target in moto's
  Application Auto Scaling (SageMaker fails such an update: the target must be deregistered first);
- otherwise the endpoint becomes `Updating`, with `PendingDeploymentSummary` naming the new config, and
  the first `DescribeEndpoint` after the call shows it so;
- the next `DescribeEndpoint` ends the deployment: if an alarm named in the request's
  `DeploymentConfig.AutoRollbackConfiguration.Alarms` is in ALARM in moto's CloudWatch (a test sets it
  with `SetAlarmState`), the endpoint stays on its previous config, `InService`, with `FailureReason`
  saying it rolled back and why; else it is `InService` on the new config, with the new config's
  variants. Either way `LastDeploymentConfig` is the request's `DeploymentConfig`, and both configs are
  kept (neither is deleted).
`RetainAllVariantProperties` and the traffic-shifting steps and waits are accepted and not simulated.

One fix to moto's CloudWatch goes with it: `PutMetricAlarm` on an existing alarm keeps the alarm's state,
as CloudWatch documents ("When you update an existing alarm, its state is left unchanged"); moto resets it
to OK, which would hide an alarm a test set before `update` re-puts its alarms.
"""

from __future__ import annotations

import sys
from typing import Any

from moto import server
from moto.applicationautoscaling.models import applicationautoscaling_backends
from moto.cloudwatch.models import Alarm, CloudWatchBackend, cloudwatch_backends
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse

SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"


def _instance_types(backend: SageMakerModelBackend, config_name: str) -> dict[str, str]:
    config = backend.endpoint_configs.get(config_name)
    variants = config.production_variants if config else []
    return {v["VariantName"]: v.get("InstanceType", "") for v in variants}


def _scalable(backend: SageMakerModelBackend, endpoint_name: str, variant: str) -> bool:
    aas = applicationautoscaling_backends[backend.account_id][backend.region_name]
    return f"endpoint/{endpoint_name}/variant/{variant}" in aas.targets.get(SCALABLE_DIMENSION, {})


def update_endpoint(
    backend: SageMakerModelBackend, endpoint_name: str, config_name: str, deployment: dict[str, Any]
) -> str:
    """Start the deployment of `config_name` on the endpoint; returns the endpoint's ARN."""
    endpoint = backend.endpoints.get(endpoint_name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(endpoint_name, backend.account_id, backend.region_name)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    new = backend.describe_endpoint_config(config_name)  # raises for an unknown config
    if endpoint.endpoint_status != "InService":
        raise ValidationError(message=f"Cannot update in-progress endpoint '{endpoint.arn}'.")
    before = _instance_types(backend, endpoint.endpoint_config_name)
    for variant, instance_type in _instance_types(backend, config_name).items():
        if (
            variant in before
            and before[variant] != instance_type
            and _scalable(backend, endpoint_name, variant)
        ):
            raise ValidationError(
                message=f"The variant {variant} is registered with Application Auto Scaling: deregister it "
                f"before changing its instance type ({before[variant]} to {instance_type})."
            )
    endpoint.endpoint_status = "Updating"
    endpoint.failure_reason = None
    endpoint.pending_deployment_summary = {
        "EndpointConfigName": config_name,
        "ProductionVariants": [
            {"VariantName": v["VariantName"], "InstanceType": v.get("InstanceType")}
            for v in new["ProductionVariants"]
        ],
        "StartTime": utcnow(),
    }
    endpoint.last_deployment_config = deployment or None
    endpoint.last_modified_time = utcnow()
    endpoint.update_seen = False  # not in DescribeEndpoint's output shape: moto's serializer drops it
    return endpoint.arn


def _advance(backend: SageMakerModelBackend, endpoint: FakeEndpoint) -> None:
    """A deployment shows `Updating` to one DescribeEndpoint, then ends at the next."""
    if endpoint.endpoint_status != "Updating" or not getattr(endpoint, "pending_deployment_summary", None):
        return
    if not endpoint.update_seen:
        endpoint.update_seen = True
        return
    new_config = endpoint.pending_deployment_summary["EndpointConfigName"]
    alarms = cloudwatch_backends[backend.account_id][backend.region_name].alarms
    rollback = (endpoint.last_deployment_config or {}).get("AutoRollbackConfiguration", {})
    tripped = [
        a["AlarmName"]
        for a in rollback.get("Alarms", [])
        if a["AlarmName"] in alarms and alarms[a["AlarmName"]].state_value == "ALARM"
    ]
    if tripped:
        endpoint.failure_reason = (
            f"Rolled back to {endpoint.endpoint_config_name} from {new_config}: "
            f"alarm {', '.join(tripped)} in ALARM during the deployment."
        )
    else:
        endpoint.endpoint_config_name = new_config
        endpoint.production_variants = endpoint._process_production_variants(
            backend.describe_endpoint_config(new_config)["ProductionVariants"]
        )
    endpoint.pending_deployment_summary = None
    endpoint.endpoint_status = "InService"
    endpoint.last_modified_time = utcnow()


_describe_endpoint = SageMakerModelBackend.describe_endpoint


def _describe_endpoint_advancing(self: SageMakerModelBackend, endpoint_name: str) -> dict[str, Any]:
    if endpoint_name in self.endpoints:
        _advance(self, self.endpoints[endpoint_name])
    return _describe_endpoint(self, endpoint_name)


def _update_endpoint_action(self: SageMakerResponse) -> ActionResult:
    arn = update_endpoint(
        self.sagemaker_backend,
        self._get_param("EndpointName"),
        self._get_param("EndpointConfigName"),
        self._get_param("DeploymentConfig") or {},
    )
    return ActionResult({"EndpointArn": arn})


_put_metric_alarm = CloudWatchBackend.put_metric_alarm
ALARM_STATE = ("state_value", "state_reason", "state_reason_data", "state_updated_timestamp")


def _put_metric_alarm_keeping_state(self: CloudWatchBackend, name: str, *args: Any, **kwargs: Any) -> Alarm:
    before = self.alarms.get(name)
    alarm = _put_metric_alarm(self, name, *args, **kwargs)
    if before is not None:
        for attribute in ALARM_STATE:
            setattr(alarm, attribute, getattr(before, attribute))
    return alarm


def install() -> None:
    """Add UpdateEndpoint to moto's SageMaker in this process; keep an alarm's state when it is re-put."""
    CloudWatchBackend.put_metric_alarm = _put_metric_alarm_keeping_state  # type: ignore[method-assign]
    SageMakerModelBackend.describe_endpoint = _describe_endpoint_advancing  # type: ignore[method-assign]
    SageMakerResponse.update_endpoint = _update_endpoint_action  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    install()
    server.main(argv or sys.argv[1:])


if __name__ == "__main__":
    main()
