"""The `fhe-bento` command line: model import and demo for model owners, CSV prediction for clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np


@click.group()
def main() -> None:
    """Serve concrete-ml FHE models with BentoML and call them on encrypted data."""


@main.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name in the BentoML store.")
@click.option("--classes", default=None, help="Comma-separated class labels, for a classifier.")
def import_cmd(folder: Path, name: str, classes: str | None) -> None:
    """Import a concrete-ml FHEModelDev FOLDER (client.zip + server.zip) into the BentoML model store."""
    from modelkit.importer import import_model

    labels = [_label(c) for c in classes.split(",")] if classes else None
    click.echo(f"imported {import_model(folder, name, labels)}")


@main.command("demo-models")
def demo_models() -> None:
    """Train, compile and import the breast-cancer demo models (logistic regression and XGBoost)."""
    from modelkit.demo import build_and_import

    for tag in build_and_import():
        click.echo(f"imported {tag}")


@main.command("models")
@click.option("--url", required=True, envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one.")
def models(url: str, token: str | None) -> None:
    """List the models a server serves."""
    from client.http_transport import HTTPTransport

    for info in HTTPTransport(url, token=token).list_models():
        click.echo(f"{info['name']}:{info['version']}  {info['model_class']}  features={info['n_features']}  "
                   f"needs_key={info['needs_key']}")


@main.command("predict")
@click.option("--url", required=True, envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one.")
@click.option("--model", "model_name", required=True, help="Served model name.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write (default stdout).")
@click.option("--proba", is_flag=True, help="Write class probabilities instead of labels.")
@click.option("--batch-size", default=8, show_default=True, help="Rows per request.")
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight.")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def predict(url: str, token: str | None, model_name: str, output: Path | None, proba: bool, batch_size: int,
            concurrency: int, data: Path) -> None:
    """Encrypt each row of the CSV file DATA, predict on the server, and write the decrypted answers."""
    from client.api import FHEClient

    model = FHEClient(url, batch_size=batch_size, concurrency=concurrency, token=token).model(model_name)
    total, rows = _csv_rows(data)
    with click.open_file(str(output) if output else "-", "w") as out:
        for scores in model.predict_proba_stream(rows, total=total):
            values = scores if proba else model.labels(scores.reshape(1, -1))
            out.write(",".join(f"{v:.10g}" if isinstance(v, float) else str(v) for v in np.ravel(values)) + "\n")


def _csv_rows(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """(row count, rows read lazily) of a numeric CSV with or without one header line."""
    with path.open() as fh:
        first = fh.readline()
        rest = sum(1 for line in fh if line.strip())
    has_header = any(c.isalpha() for c in first.replace("e", "").replace("E", ""))
    total = rest + (0 if has_header or not first.strip() else 1)

    def rows() -> Iterator[np.ndarray]:
        with path.open() as fh:
            if has_header:
                next(fh)
            for line in fh:
                if line.strip():
                    yield np.array([float(v) for v in line.split(",")])

    return total, rows()


def _label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


@main.group()
def sagemaker() -> None:
    """Build the SageMaker image, deploy endpoints, tear them down (boto3's usual credential chain)."""


@sagemaker.command("deploy")
@click.option("--endpoint-name", required=True)
@click.option("--role", "role_arn", required=True, help="IAM role SageMaker assumes (S3 read, ECR pull, logs).")
@click.option("--bucket", required=True, help="S3 bucket for model.tar.gz.")
@click.option("--prefix", default="fhe-bento", show_default=True, help="S3 key prefix for model.tar.gz.")
@click.option("--image-uri", help="An image already in ECR.")
@click.option("--push-image", help="A local image to push to ECR instead (needs --ecr-repository).")
@click.option("--ecr-repository", help="ECR repository for --push-image.")
@click.option("--push-tool", default="podman", show_default=True, type=click.Choice(["podman", "docker"]))
@click.option("--models", "tags", help="Comma-separated BentoML model tags to pack.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Or a folder of model folders to pack.")
@click.option("--instance-type", default="ml.m5.xlarge", show_default=True)
@click.option("--instance-count", default=1, show_default=True)
@click.option("--async-output", help="s3://... output path: makes an asynchronous endpoint.")
@click.option("--async-failure", help="s3://... failure path of an asynchronous endpoint.")
@click.option("--max-concurrent", type=int, help="Async MaxConcurrentInvocationsPerInstance.")
@click.option("--env", "environment", multiple=True, help="NAME=VALUE for the container (repeatable).")
@click.option("--wait/--no-wait", default=False, help="Wait until the endpoint is InService.")
def deploy(endpoint_name: str, role_arn: str, bucket: str, prefix: str, image_uri: str | None,
           push_image: str | None, ecr_repository: str | None, push_tool: str, tags: str | None,
           model_dir: Path | None, instance_type: str, instance_count: int, async_output: str | None,
           async_failure: str | None, max_concurrent: int | None, environment: tuple[str, ...], wait: bool) -> None:
    """Pack and upload the models, then create the Model, EndpointConfig and Endpoint."""
    import tempfile

    import boto3

    from modelkit import sagemaker_deploy as sd

    if bool(image_uri) == bool(push_image):
        raise click.UsageError("give exactly one of --image-uri or --push-image")
    if push_image and not ecr_repository:
        raise click.UsageError("--push-image needs --ecr-repository")
    folders = sd.model_folders_from_dir(model_dir) if model_dir else sd.model_folders_from_store(
        [t.strip() for t in (tags or "breast-cancer-xgb:latest,breast-cancer-logreg:latest").split(",")]
    )
    with tempfile.TemporaryDirectory() as tmp:
        tarball = sd.pack_models(folders, Path(tmp) / "model.tar.gz")
        model_data_url = sd.upload_model_data(boto3.client("s3"), tarball, bucket, prefix)
    click.echo(f"uploaded {model_data_url} ({', '.join(folders)})")
    if push_image:
        image_uri = sd.push_image(boto3.client("ecr"), push_image, ecr_repository, push_tool)
        click.echo(f"pushed {image_uri}")
    config = sd.DeployConfig(
        endpoint_name=endpoint_name, image_uri=image_uri, role_arn=role_arn, model_data_url=model_data_url,
        instance_type=instance_type, instance_count=instance_count, async_output_path=async_output,
        async_failure_path=async_failure, max_concurrent_invocations=max_concurrent,
        environment=dict(item.split("=", 1) for item in environment),
    )
    sm = boto3.client("sagemaker")
    created = sd.create_endpoint(sm, config)
    click.echo(f"created {created['endpoint_arn']}")
    if wait:
        click.echo(f"endpoint {endpoint_name} is {sd.wait_in_service(sm, endpoint_name)}")


@sagemaker.command("delete")
@click.option("--endpoint-name", required=True)
def delete(endpoint_name: str) -> None:
    """Delete an endpoint with its EndpointConfig and Model."""
    import boto3

    from modelkit.sagemaker_deploy import delete_endpoint

    delete_endpoint(boto3.client("sagemaker"), endpoint_name)
    click.echo(f"deleted {endpoint_name}")


@sagemaker.command("build-image")
@click.option("--backend", default="docker", show_default=True,
              type=click.Choice(["docker", "buildah", "podman", "buildx", "nerdctl"]),
              help="bentoml containerize backend: docker where a daemon runs, buildah/podman without one.")
@click.option("--base-image", envvar="FHE_BENTO_BASE_IMAGE", help="Base image [default: python:3.11-slim].")
@click.option("--repository", default="localhost/fhe-bento", show_default=True, help="Image name to tag.")
def build_image(backend: str, base_image: str | None, repository: str) -> None:
    """bentoml build + bentoml containerize: an image that serves /ping and /invocations on 8080."""
    from modelkit.image import build_image as build

    click.echo(build(backend, base_image, repository))
