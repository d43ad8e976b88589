"""The `fhe-bento` command line: the data owner's commands (`client.cli`) and the model owner's: import,
demo models, and the SageMaker image and endpoints."""

from __future__ import annotations

from pathlib import Path

import click

from fhe_bento.client import cli as client_cli
from fhe_bento.client.cli import main as client_main
from fhe_bento.protocol.names import DEMO_MODELS


@click.group(commands=list(client_main.commands.values()))
def main() -> None:
    """Serve concrete-ml FHE models with BentoML and call them on encrypted data."""


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name in the BentoML store.")
@click.option("--classes", default=None, help="Comma-separated class labels, for a classifier.")
def import_cmd(folder: Path, name: str, classes: str | None) -> None:
    """Import a concrete-ml FHEModelDev FOLDER (client.zip + server.zip) into the BentoML model store."""
    from fhe_bento.modelkit.importer import import_model

    labels = [_label(c) for c in classes.split(",")] if classes else None
    click.echo(f"imported {import_model(folder, name, labels)}")


@main.command("demo-models")
def demo_models() -> None:
    """Train, compile and import the demo models: breast-cancer logistic regression and XGBoost, and the
    hybrid tiny-gpt2."""
    from fhe_bento.modelkit.demo import build_and_import, build_and_import_hybrid

    for tag in [*build_and_import(), build_and_import_hybrid()]:
        click.echo(f"imported {tag}")


def _label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


@main.group(commands=list(client_cli.sagemaker.commands.values()))
def sagemaker() -> None:
    """Build the SageMaker image, deploy endpoints, tear them down, run Batch Transform jobs (boto3's usual
    credential chain)."""


@sagemaker.command("deploy")
@click.option("--endpoint-name", required=True)
@click.option(
    "--role", "role_arn", required=True, help="IAM role SageMaker assumes (S3 read, ECR pull, logs)."
)
@click.option("--bucket", required=True, help="S3 bucket for model.tar.gz.")
@click.option("--prefix", default="fhe-bento", show_default=True, help="S3 key prefix for model.tar.gz.")
@click.option("--image-uri", help="An image already in ECR.")
@click.option("--push-image", help="A local image to push to ECR instead (needs --ecr-repository).")
@click.option("--ecr-repository", help="ECR repository for --push-image.")
@click.option("--push-tool", default="podman", show_default=True, type=click.Choice(["podman", "docker"]))
@click.option("--models", "tags", help="Comma-separated BentoML model tags to pack.")
@click.option(
    "--model-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Or a folder of model folders to pack.",
)
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
@click.option("--env", "environment", multiple=True, help="NAME=VALUE for the container (repeatable).")
@click.option(
    "--wait/--no-wait", default=False, help="Wait until the endpoint is InService (always with autoscaling)."
)
@click.option(
    "--poll-seconds", default=15, show_default=True, help="How often --wait asks for the endpoint's status."
)
def deploy(
    endpoint_name: str,
    role_arn: str,
    bucket: str,
    prefix: str,
    image_uri: str | None,
    push_image: str | None,
    ecr_repository: str | None,
    push_tool: str,
    tags: str | None,
    model_dir: Path | None,
    instance_type: str,
    instance_count: int,
    key_store: str | None,
    min_instances: int | None,
    max_instances: int | None,
    async_output: str | None,
    async_failure: str | None,
    max_concurrent: int | None,
    environment: tuple[str, ...],
    wait: bool,
    poll_seconds: int,
) -> None:
    """Pack and upload the models, then create the Model, EndpointConfig and Endpoint, and with
    --min-instances/--max-instances its autoscaling."""
    import tempfile

    import boto3
    from sagemaker.core.helper.session_helper import Session

    from fhe_bento.modelkit import sagemaker_deploy as sd
    from fhe_bento.modelkit import sagemaker_scaling
    from fhe_bento.runtime.settings import Settings

    if (min_instances is None) != (max_instances is None):
        raise click.UsageError("give both --min-instances and --max-instances, or neither")

    if bool(image_uri) == bool(push_image):
        raise click.UsageError("give exactly one of --image-uri or --push-image")
    if push_image and not ecr_repository:
        raise click.UsageError("--push-image needs --ecr-repository")
    folders = (
        sd.model_folders_from_dir(model_dir)
        if model_dir
        else sd.model_folders_from_store([t.strip() for t in (tags or ",".join(DEMO_MODELS)).split(",")])
    )
    env = dict(item.split("=", 1) for item in environment)
    try:  # the whole deployment is checked before anything is uploaded or created
        config = sd.DeployConfig(
            endpoint_name=endpoint_name,
            image_uri=str(image_uri or push_image),  # exactly one is given
            role_arn=role_arn,
            model_data_url=sd.model_data_url(bucket, prefix),
            key_store=key_store or f"s3://{bucket}/{prefix.strip('/')}/keys",
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
    with tempfile.TemporaryDirectory() as tmp:
        tarball = sd.pack_models(folders, Path(tmp) / "model.tar.gz")
        sd.upload_model_data(boto3.client("s3"), tarball, config.model_data_url)
    click.echo(f"uploaded {config.model_data_url} ({', '.join(folders)})")
    if push_image:
        pushed = sd.push_image(boto3.client("ecr"), push_image, str(ecr_repository), push_tool)
        config = config.model_copy(update={"image_uri": pushed})
        click.echo(f"pushed {pushed}")
    session = Session(boto_session=boto3.Session())
    created = sd.create_endpoint(session, config)
    click.echo(f"created {created['endpoint_arn']} (keys in {config.key_store})")
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


@sagemaker.command("delete")
@click.option("--endpoint-name", required=True)
def delete(endpoint_name: str) -> None:
    """Delete an endpoint with its autoscaling, EndpointConfig and Model."""
    import boto3

    from fhe_bento.modelkit import sagemaker_scaling
    from fhe_bento.modelkit.sagemaker_deploy import delete_endpoint

    sagemaker_scaling.disable(
        boto3.client("application-autoscaling"), boto3.client("cloudwatch"), endpoint_name
    )
    delete_endpoint(endpoint_name)
    click.echo(f"deleted {endpoint_name}")


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
