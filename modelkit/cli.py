"""The `fhe-bento` command line: the data owner's commands (`client.cli`) and the model owner's: import,
demo models, and the SageMaker image and endpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from fhe_bento.client import cli as client_cli
from fhe_bento.client.cli import main as client_main
from fhe_bento.protocol.names import DEMO_MODELS

if TYPE_CHECKING:
    from fhe_bento.modelkit.sagemaker_deploy import DeployConfig
    from fhe_bento.modelkit.sagemaker_update import Deployment

F = TypeVar("F", bound=Callable[..., Any])


@click.group(commands=list(client_main.commands.values()))
def main() -> None:
    """Serve concrete-ml FHE models with BentoML and call them on encrypted data."""


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name in the BentoML store.")
@click.option("--classes", default=None, help="Comma-separated class labels, for a classifier.")
def import_cmd(folder: Path, name: str, classes: str | None) -> None:
    """Import a concrete-ml FHEModelDev FOLDER (client.zip + server.zip; inference or training mode), or a
    HybridFHEModel folder saved by save_and_clear_private_info, into the BentoML model store."""
    from fhe_bento.modelkit.importer import import_model

    labels = [_label(c) for c in classes.split(",")] if classes else None
    try:
        click.echo(f"imported {import_model(folder, name, labels)}")
    except (ValueError, FileNotFoundError) as exc:  # a folder fhe-bento cannot serve: say why, no traceback
        raise click.ClickException(str(exc)) from None


@main.command("demo-models")
@click.option(
    "--training", is_flag=True, help="Also the training demo, breast-cancer-training (docs/training.md)."
)
@click.option(
    "--tfhe-rs",
    "tfhe_rs",
    is_flag=True,
    help="Also the TFHE-rs demo, breast-cancer-xgb-tfhe-rs (docs/models.md, TFHE-rs ciphertexts).",
)
def demo_models(training: bool, tfhe_rs: bool) -> None:
    """Train, compile and import the demo models: breast-cancer logistic regression and XGBoost, and the
    hybrid tiny-gpt2."""
    from fhe_bento.modelkit import demo

    tags = [*demo.build_and_import(), demo.build_and_import_hybrid()]
    tags += [demo.build_and_import_training()] if training else []
    tags += [demo.build_and_import_tfhe_rs()] if tfhe_rs else []
    for tag in tags:
        click.echo(f"imported {tag}")


def _label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


@main.group(commands=list(client_cli.sagemaker.commands.values()))
def sagemaker() -> None:
    """Build the SageMaker image, deploy endpoints, update and roll them back, tear them down, run Batch
    Transform jobs (boto3's usual credential chain)."""


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator."""

    def apply(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


@dataclass(frozen=True)
class ModelSource:
    """What `deploy` and `update` ship: the models, where model.tar.gz goes, the image and the container's
    extra environment (their shared options)."""

    bucket: str
    prefix: str
    tags: str | None
    model_dir: Path | None
    image_uri: str | None
    push_image: str | None
    ecr_repository: str | None
    push_tool: str
    environment: tuple[str, ...]

    def check(self) -> tuple[dict[str, str], dict[str, Path]]:
        """The environment and the model folders (each loaded); ValueError for anything wrong."""
        from fhe_bento.modelkit import sagemaker_deploy as sd

        if self.image_uri and self.push_image:
            raise ValueError("give --image-uri or --push-image, not both")
        if self.push_image and not self.ecr_repository:
            raise ValueError("--push-image needs --ecr-repository")
        tags = [t.strip() for t in (self.tags or ",".join(DEMO_MODELS)).split(",")]
        return sd.parse_environment(self.environment), sd.checked_model_folders(self.model_dir, tags)

    def ship(self, config: DeployConfig, folders: dict[str, Path]) -> DeployConfig:
        """Upload model.tar.gz and, if asked, push the image; returns the config with the pushed image."""
        import boto3

        from fhe_bento.modelkit import sagemaker_deploy as sd

        sd.upload_models(boto3.client("s3"), folders, config.model_data_url)
        click.echo(f"uploaded {config.model_data_url} ({', '.join(folders)})")
        if not self.push_image:
            return config
        pushed = sd.push_image(boto3.client("ecr"), self.push_image, str(self.ecr_repository), self.push_tool)
        click.echo(f"pushed {pushed}")
        return config.model_copy(update={"image_uri": pushed})


def _model_source_options(command: F) -> F:
    """The options of `ModelSource`, handed to the command as one `source` argument."""

    @functools.wraps(command)
    def with_source(**given: Any) -> Any:
        source = ModelSource(**{field.name: given.pop(field.name) for field in fields(ModelSource)})
        return command(source=source, **given)

    return _options(
        click.option("--bucket", required=True, help="S3 bucket for model.tar.gz."),
        click.option(
            "--prefix", default="fhe-bento", show_default=True, help="S3 key prefix for model.tar.gz."
        ),
        click.option(
            "--models", "tags", help="Comma-separated BentoML model tags to pack [default: the demo models]."
        ),
        click.option(
            "--model-dir",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Or a folder of model folders to pack.",
        ),
        click.option("--image-uri", help="An image already in ECR."),
        click.option("--push-image", help="A local image to push to ECR instead (needs --ecr-repository)."),
        click.option("--ecr-repository", help="ECR repository for --push-image."),
        click.option(
            "--push-tool", default="podman", show_default=True, type=click.Choice(["podman", "docker"])
        ),
        click.option(
            "--env", "environment", multiple=True, help="NAME=VALUE for the container (repeatable)."
        ),
    )(cast(F, with_source))


_latency_option = click.option(
    "--latency-alarm-ms",
    type=click.IntRange(min=1),
    help="ModelLatency p99 (one minute) above which the rollback alarm fires [default: 30000 real time, "
    "1800000 async; update: the alarm's current threshold].",
)


def _monitor(endpoint_name: str, latency_ms: int) -> list[str]:
    import boto3

    from fhe_bento.modelkit import sagemaker_monitoring

    alarms = sagemaker_monitoring.put_monitoring(boto3.client("cloudwatch"), endpoint_name, latency_ms)
    click.echo(f"dashboard {endpoint_name}, rollback alarms {', '.join(alarms)}")
    return alarms


@sagemaker.command("deploy")
@click.option("--endpoint-name", required=True)
@click.option(
    "--role", "role_arn", required=True, help="IAM role SageMaker assumes (S3 read, ECR pull, logs)."
)
@_model_source_options
@click.option("--instance-type", default="ml.m5.xlarge", show_default=True)
@click.option("--instance-count", default=1, show_default=True)
@click.option(
    "--key-store",
    help="FHE_BENTO_KEY_STORE of every instance [default: s3://BUCKET/PREFIX/keys]; "
    "file:// only for one instance without autoscaling.",
)
@click.option("--min-instances", type=int, help="Autoscaling lower bound (0 allowed for an async endpoint).")
@click.option(
    "--max-instances", type=int, help="Autoscaling upper bound; with --min-instances, registers autoscaling."
)
@click.option("--async-output", help="s3://... output path: makes an asynchronous endpoint.")
@click.option("--async-failure", help="s3://... failure path of an asynchronous endpoint.")
@click.option("--max-concurrent", type=int, help="Async MaxConcurrentInvocationsPerInstance.")
@_latency_option
@click.option(
    "--wait/--no-wait", default=False, help="Wait until the endpoint is InService (always with autoscaling)."
)
@click.option(
    "--poll-seconds", default=15, show_default=True, help="How often --wait asks for the endpoint's status."
)
def deploy(
    endpoint_name: str,
    role_arn: str,
    source: ModelSource,
    instance_type: str,
    instance_count: int,
    key_store: str | None,
    min_instances: int | None,
    max_instances: int | None,
    async_output: str | None,
    async_failure: str | None,
    max_concurrent: int | None,
    latency_alarm_ms: int | None,
    wait: bool,
    poll_seconds: int,
) -> None:
    """Pack and upload the models, then create the Model, EndpointConfig and Endpoint, the dashboard and
    rollback alarms, and with --min-instances/--max-instances its autoscaling."""
    import boto3
    from sagemaker.core.helper.session_helper import Session

    from fhe_bento.modelkit import sagemaker_deploy as sd
    from fhe_bento.modelkit import sagemaker_monitoring, sagemaker_scaling
    from fhe_bento.runtime.settings import Settings

    if (min_instances is None) != (max_instances is None):
        raise click.UsageError("give both --min-instances and --max-instances, or neither")
    if not (source.image_uri or source.push_image):
        raise click.UsageError("give exactly one of --image-uri or --push-image")
    try:  # the whole deployment is checked before anything is uploaded or created
        env, folders = source.check()
        config = sd.DeployConfig(
            endpoint_name=endpoint_name,
            image_uri=str(source.image_uri or source.push_image),  # exactly one is given
            role_arn=role_arn,
            model_data_url=sd.model_data_url(source.bucket, source.prefix),
            key_store=key_store or f"s3://{source.bucket}/{source.prefix.strip('/')}/keys",
            instance_type=instance_type,
            instance_count=instance_count,
            max_instances=max_instances or 1,
            async_output_path=async_output,
            async_failure_path=async_failure,
            max_concurrent_invocations=max_concurrent,
            environment=env,
        )
        scaling = (
            None
            if max_instances is None or min_instances is None  # both or neither
            else sagemaker_scaling.ScalingConfig(
                min_instances=min_instances,
                max_instances=max_instances,
                asynchronous=bool(async_output),
                row_seconds=sd.slowest_row_seconds(folders),
                parallel_rows=Settings.for_environment(env).parallel_rows(),
            )
        )
    except ValueError as exc:  # pydantic's ValidationError is one
        raise click.UsageError(str(exc)) from None
    config = source.ship(config, folders)
    session = Session(boto_session=boto3.Session())
    created = sd.create_endpoint(session, config)
    click.echo(f"created {created['endpoint_arn']} (keys in {config.key_store})")
    _monitor(endpoint_name, latency_alarm_ms or sagemaker_monitoring.default_latency_ms(bool(async_output)))
    if not (wait or scaling):
        return
    status = sd.wait_in_service(
        session, endpoint_name, poll_seconds
    )  # Application Auto Scaling takes only an endpoint in service
    click.echo(f"\nendpoint {endpoint_name} is {status}")  # after the SDK's progress marks
    if scaling is not None:
        if status != "InService":
            raise click.ClickException("the endpoint is not in service: autoscaling not registered")
        made = sagemaker_scaling.enable(
            boto3.client("application-autoscaling"), boto3.client("cloudwatch"), endpoint_name, scaling
        )
        click.echo(
            f"autoscaling {made['resource_id']}: {min_instances}..{max_instances} instances, "
            f"target {made['target']}"
        )


_wait_options = _options(
    click.option(
        "--timeout-seconds",
        default=3600,
        show_default=True,
        help="How long to wait for the deployment (its traffic shifting and waits included).",
    ),
    click.option("--poll-seconds", default=15, show_default=True, help="How often to ask for its status."),
)


def _clients() -> dict[str, Any]:
    import boto3

    return {name: boto3.client(name) for name in ("sagemaker", "application-autoscaling", "cloudwatch")}


def _report(outcome: Deployment, endpoint_name: str, left: str, timeout_seconds: int) -> None:
    """Say how a switch of EndpointConfig ended; anything but the target in service fails the command."""
    reason = outcome.described.get("FailureReason")
    config = outcome.described["EndpointConfigName"]
    if outcome.succeeded:
        click.echo(
            f"endpoint {endpoint_name} is InService on {config}; `fhe-bento sagemaker rollback --endpoint-name "
            f"{endpoint_name}` returns to {left}"
        )
        return
    if outcome.rolled_back:
        raise click.ClickException(
            f"SageMaker rolled the deployment back: endpoint {endpoint_name} is InService on {config}"
            + (f" ({reason})" if reason else "")
        )
    message = f"endpoint {endpoint_name} is {outcome.status}" + (f": {reason}" if reason else "")
    if outcome.status == "Updating":
        message += f" after {timeout_seconds} s"
    if outcome.reregistered:
        message += (
            f"; autoscaling is deregistered (it had {outcome.reregistered.min_capacity}.."
            f"{outcome.reregistered.max_capacity} instances)"
        )
    raise click.ClickException(message)


@sagemaker.command("update")
@click.option("--endpoint-name", required=True)
@_model_source_options
@click.option("--role", "role_arn", help="IAM role SageMaker assumes [default: the current Model's].")
@click.option("--instance-type", help="[default: the endpoint's]")
@click.option("--instance-count", type=int, help="[default: the instances the endpoint runs now]")
@click.option(
    "--key-store",
    help="FHE_BENTO_KEY_STORE, an s3:// store [default: the current Model's, so that keys stay registered].",
)
@click.option(
    "--canary-percent",
    type=int,
    help="Canary: shift this % of capacity (1-50), the rest after --wait-seconds.",
)
@click.option(
    "--linear-step-percent", type=int, help="Linear: shift this % of capacity (10-50) every --wait-seconds."
)
@click.option(
    "--wait-seconds",
    default=300,
    show_default=True,
    help="Between traffic steps; all at once (the default), the baking period after the shift.",
)
@_latency_option
@_wait_options
def update(
    endpoint_name: str,
    source: ModelSource,
    role_arn: str | None,
    instance_type: str | None,
    instance_count: int | None,
    key_store: str | None,
    canary_percent: int | None,
    linear_step_percent: int | None,
    wait_seconds: int,
    latency_alarm_ms: int | None,
    timeout_seconds: int,
    poll_seconds: int,
) -> None:
    """Deploy a new model set on a running endpoint, blue/green: a new Model and EndpointConfig (what is not
    given is kept from the one in service), then UpdateEndpoint with automatic rollback on the 5xx and
    latency alarms. The previous EndpointConfig is kept for `rollback`; autoscaling stays registered."""
    import boto3
    from sagemaker.core.helper.session_helper import Session

    from fhe_bento.modelkit import sagemaker_deploy as sd
    from fhe_bento.modelkit import sagemaker_monitoring
    from fhe_bento.modelkit import sagemaker_update as su

    try:  # everything the command line says is checked before the first AWS call
        options = su.UpdateOptions(
            endpoint_name=endpoint_name,
            canary_percent=canary_percent,
            linear_step_percent=linear_step_percent,
            wait_seconds=wait_seconds,
            latency_alarm_ms=latency_alarm_ms,
            key_store=key_store,
            instance_type=instance_type,
            instance_count=instance_count,
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
        )
        env, folders = source.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    clients = _clients()
    current = su.current_generation(clients["sagemaker"], endpoint_name)
    if current.status != "InService":
        raise click.ClickException(f"endpoint {endpoint_name} is {current.status}: an update needs InService")
    name, url = su.new_generation(endpoint_name, source.bucket, source.prefix)
    try:  # what is kept from the generation in service, checked before anything is written
        config = sd.DeployConfig(
            endpoint_name=endpoint_name,
            image_uri=source.image_uri or source.push_image or current.image_uri,
            role_arn=role_arn or current.role_arn,
            model_data_url=url,
            key_store=options.key_store or current.key_store,
            instance_type=options.instance_type or current.instance_type,
            instance_count=options.instance_count or current.instance_count,
            environment={**current.environment, **env},
            **current.async_fields(),
        )
        su.check_shared_key_store(config.key_store)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if config.key_store != current.key_store:
        click.echo(f"key store {current.key_store} to {config.key_store}: clients upload their keys again")
    config = source.ship(config, folders)
    sd.create_model_and_config(Session(boto_session=boto3.Session()), config, name, name)
    click.echo(f"created Model and EndpointConfig {name}")
    latency = options.latency_alarm_ms or sagemaker_monitoring.latency_alarm_ms(
        clients["cloudwatch"], endpoint_name, bool(current.async_config)
    )
    deployment = options.deployment_config(_monitor(endpoint_name, latency))
    routing = deployment["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    click.echo(f"updating {endpoint_name}: {current.config_name} to {name}, blue/green {routing['Type']}")
    outcome = su.switch_config(
        clients, endpoint_name, current, name, config.instance_type, deployment, options, click.echo
    )
    su.settle(clients["sagemaker"], current, outcome)
    _report(outcome, endpoint_name, current.config_name, timeout_seconds)


@sagemaker.command("rollback")
@click.option("--endpoint-name", required=True)
@_wait_options
def rollback(endpoint_name: str, timeout_seconds: int, poll_seconds: int) -> None:
    """Return an endpoint to the EndpointConfig it had before its last update (or rollback), blue/green all
    at once; autoscaling stays registered."""
    from fhe_bento.modelkit import sagemaker_update as su

    try:
        options = su.WaitOptions(timeout_seconds=timeout_seconds, poll_seconds=poll_seconds)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    clients = _clients()
    current = su.current_generation(clients["sagemaker"], endpoint_name)
    previous = current.previous_config
    if current.status != "InService":
        raise click.ClickException(
            f"endpoint {endpoint_name} is {current.status}: a rollback needs InService"
        )
    if previous is None or previous == current.config_name:
        raise click.ClickException(
            f"endpoint {endpoint_name} has no previous EndpointConfig to return to (it is on {current.config_name})"
        )
    target_type = su.variant_of(clients["sagemaker"].describe_endpoint_config(EndpointConfigName=previous))[
        "InstanceType"
    ]
    click.echo(f"rolling {endpoint_name} back: {current.config_name} to {previous}")
    outcome = su.switch_config(
        clients, endpoint_name, current, previous, target_type, su.ROLLBACK_DEPLOYMENT, options, click.echo
    )
    _report(outcome, endpoint_name, current.config_name, timeout_seconds)


@sagemaker.command("delete")
@click.option("--endpoint-name", required=True)
def delete(endpoint_name: str) -> None:
    """Delete an endpoint with its autoscaling, dashboard, alarms, EndpointConfigs and Models."""
    from fhe_bento.modelkit import sagemaker_monitoring, sagemaker_scaling
    from fhe_bento.modelkit.sagemaker_deploy import delete_endpoint
    from fhe_bento.modelkit.sagemaker_update import held_resources

    clients = _clients()
    configs, models = held_resources(clients["sagemaker"], endpoint_name)
    sagemaker_scaling.disable(clients["application-autoscaling"], clients["cloudwatch"], endpoint_name)
    sagemaker_monitoring.delete_monitoring(clients["cloudwatch"], endpoint_name)
    delete_endpoint(endpoint_name, configs, models)
    click.echo(f"deleted {endpoint_name} ({', '.join(configs)}; {', '.join(models)})")


@sagemaker.command("build-image")
@click.option(
    "--backend",
    default="docker",
    show_default=True,
    type=click.Choice(["docker", "buildah", "podman", "buildx", "nerdctl"]),
    help="bentoml containerize backend: docker where a daemon runs, buildah/podman without one.",
)
@click.option("--base-image", envvar="FHE_BENTO_BASE_IMAGE", help="Base image [default: python:3.11-slim].")
@click.option("--repository", default="localhost/fhe-bento", show_default=True, help="Image name to tag.")
def build_image(backend: str, base_image: str | None, repository: str) -> None:
    """bentoml build + bentoml containerize: an image that serves /ping and /invocations on 8080."""
    from fhe_bento.modelkit.image import build_image as build

    click.echo(build(backend, base_image, repository))
