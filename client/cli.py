"""The data owner's commands of the `fhe-bento` command line: list a server's models, predict a CSV, train
a training circuit on a CSV.
The model owner's commands (import, demo models, SageMaker) are in `modelkit.cli`."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np

from fhe_bento.client.answers import FHEServiceError


@click.group()
def main() -> None:
    """Call fhe-bento models on encrypted data."""


@main.command("models")
@click.option("--url", required=True, envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one.")
def models(url: str, token: str | None) -> None:
    """List the models a server serves."""
    from fhe_bento.client.http_transport import HTTPTransport

    for info in HTTPTransport(url, token=token).list_models():
        click.echo(
            f"{info['name']}:{info['version']}  {info['model_class']}  features={info['n_features']}  "
            f"needs_key={info['needs_key']}"
        )


@main.group()
def versions() -> None:
    """See and change which versions of a model serve (admin token if the server has tokens)."""


def _version_options(command):
    for option in reversed(
        (
            click.option("--url", envvar="FHE_BENTO_URL", help="Server URL."),
            click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one."),
            click.option("--endpoint-name", help="Or a SageMaker endpoint (boto3's credentials and region)."),
            click.option("--model", "model_name", required=True, help="Served model name."),
        )
    ):
        command = option(command)
    return command


def _transport(url: str | None, token: str | None, endpoint_name: str | None):
    """The server at `url`, or the real-time SageMaker endpoint `endpoint_name` (exactly one of them)."""
    if endpoint_name and not url:
        from fhe_bento.client.sagemaker_transport import RuntimeInvoker, SageMakerTransport

        return SageMakerTransport(RuntimeInvoker(endpoint_name))
    if not url or endpoint_name:
        raise click.UsageError("give --url or --endpoint-name")
    from fhe_bento.client.http_transport import HTTPTransport

    return HTTPTransport(url, token=token)


@versions.command("list")
@_version_options
def list_versions(url: str | None, token: str | None, endpoint_name: str | None, model_name: str) -> None:
    """The model's served versions: default, retired, client SHA-256."""
    info = _transport(url, token, endpoint_name).get_model(model_name)
    for version, facts in info["versions"].items():
        flags = "default" if facts["default"] else "retired" if facts["retired"] else "served"
        click.echo(f"{model_name}:{version}  {flags}  client_sha256={facts['client_sha256']}")


def _show(model_name: str, state: dict) -> None:
    retired = ", ".join(state["retired"]) or "none"
    click.echo(f"{model_name}: default {state['default']}, retired {retired} (revision {state['revision']})")


@versions.command("default")
@_version_options
@click.argument("version")
def default_version(
    url: str | None, token: str | None, endpoint_name: str | None, model_name: str, version: str
) -> None:
    """Make VERSION serve requests that name the model alone."""
    _show(model_name, _transport(url, token, endpoint_name).set_default_version(model_name, version))


@versions.command("retire")
@_version_options
@click.argument("version")
def retire_version(
    url: str | None, token: str | None, endpoint_name: str | None, model_name: str, version: str
) -> None:
    """Retire VERSION: its clients move to the default (they make and upload new keys once)."""
    _show(model_name, _transport(url, token, endpoint_name).retire_version(model_name, version))


@main.command("predict")
@click.option("--url", required=True, envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one.")
@click.option("--model", "model_name", required=True, help="Served model name.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write (default stdout)."
)
@click.option("--proba", is_flag=True, help="Write class probabilities instead of labels.")
@click.option("--batch-size", default=8, show_default=True, help="Rows per request.")
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight.")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def predict(
    url: str,
    token: str | None,
    model_name: str,
    output: Path | None,
    proba: bool,
    batch_size: int,
    concurrency: int,
    data: Path,
) -> None:
    """Encrypt each row of the CSV file DATA, predict on the server, and write the decrypted answers."""
    from fhe_bento.client.api import FHEClient

    model = FHEClient(url, batch_size=batch_size, concurrency=concurrency, token=token).model(model_name)
    total, rows = _csv_rows(data)
    with click.open_file(str(output) if output else "-", "w") as out:
        for scores in model.predict_proba_stream(rows, total=total):
            _write_row(out, model, scores, proba)


def _write_row(out, model, scores: np.ndarray, proba: bool) -> None:
    values = scores if proba else model.labels(scores.reshape(1, -1))
    out.write(",".join(f"{v:.10g}" if isinstance(v, float) else str(v) for v in np.ravel(values)) + "\n")


@main.command("train")
@click.option("--url", envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--token", envvar="FHE_BENTO_TOKEN", help="Bearer token, if the server needs one.")
@click.option("--endpoint-name", help="Or a real-time SageMaker endpoint (boto3's credentials and region).")
@click.option("--model", "model_name", required=True, help="Served training model name.")
@click.option("--label-column", default=-1, show_default=True, help="Column of the 0/1 label (-1: the last).")
@click.option("--epochs", default=1, show_default=True, help="Passes over the rows.")
@click.option("--seed", default=0, show_default=True, help="Seed of the batches and the initial weights.")
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="JSON to write (default stdout)."
)
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def train(
    url: str | None,
    token: str | None,
    endpoint_name: str | None,
    model_name: str,
    label_column: int,
    epochs: int,
    seed: int,
    output: Path | None,
    data: Path,
) -> None:
    """Train the training circuit MODEL in FHE on the CSV file DATA (features and a 0/1 label per row, scaled
    as the model was compiled): the server sees only encrypted batches. Writes the decrypted weights as
    JSON `{"coef": [...], "intercept": ...}`. Run it again with the same arguments to carry on a training
    that was cut short."""
    from fhe_bento.client.api import FHEClient

    transport = _transport(url, token, endpoint_name)
    table = np.vstack(list(_csv_rows(data)[1]))
    labels = table[:, label_column]
    features = np.delete(table, label_column % table.shape[1], axis=1)
    model = FHEClient(transport=transport).model(model_name).fit(features, labels, epochs=epochs, seed=seed)
    trained = {"coef": model.coef_.ravel().tolist(), "intercept": float(model.intercept_[0])}
    with click.open_file(str(output) if output else "-", "w") as out:
        out.write(json.dumps(trained) + "\n")


@main.group()
def sagemaker() -> None:
    """SageMaker Batch Transform jobs on a deployed model (boto3's usual credential chain)."""


def _batch_model(model_name: str, models: str, key_endpoint: str | None):
    import boto3

    from fhe_bento.client.api import FHEClient
    from fhe_bento.client.batch_transform import ArtifactsTransport
    from fhe_bento.client.sagemaker_transport import ModelFolders, RuntimeInvoker, SageMakerTransport

    keys = SageMakerTransport(RuntimeInvoker(key_endpoint)) if key_endpoint else None
    transport = ArtifactsTransport(ModelFolders(models, boto3.client("s3")), keys)
    return FHEClient(transport=transport).model(model_name)


MODEL_OPTIONS = [
    click.option(
        "--model", "model_name", required=True, help="Served model name (a folder of the artifacts)."
    ),
    click.option(
        "--models",
        required=True,
        help="The deployed s3://.../model.tar.gz (or a local folder of model folders).",
    ),
    click.option(
        "--key-endpoint", help="A real-time endpoint on the fleet's key store, to register the key through."
    ),
]


def _model_options(command):
    for option in reversed(MODEL_OPTIONS):
        command = option(command)
    return command


def _write_results(model, results: list, output: Path | None, proba: bool) -> int:
    """Write one CSV line per row (`error,<code>` for a row whose record failed); returns the failures."""
    failed = 0
    with click.open_file(str(output) if output else "-", "w") as out:
        for result in results:
            if isinstance(result, FHEServiceError):
                failed += 1
                out.write(f"error,{result.code}\n")
            else:
                _write_row(out, model, result, proba)
    return failed


@sagemaker.command("batch")
@_model_options
@click.option(
    "--sagemaker-model", required=True, help="The SageMaker Model to run (deploy makes ENDPOINT-model)."
)
@click.option("--job-name", required=True)
@click.option("--input-prefix", required=True, help="s3://... for the encrypted records.")
@click.option("--output-prefix", required=True, help="s3://... for the job's answers.")
@click.option("--instance-type", default="ml.m5.xlarge", show_default=True)
@click.option("--instance-count", default=1, show_default=True)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write (default stdout)."
)
@click.option("--proba", is_flag=True, help="Write class probabilities instead of labels.")
@click.option("--wait/--no-wait", default=True, help="Wait for the job and write its decrypted answers.")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def batch(
    model_name: str,
    models: str,
    key_endpoint: str | None,
    sagemaker_model: str,
    job_name: str,
    input_prefix: str,
    output_prefix: str,
    instance_type: str,
    instance_count: int,
    output: Path | None,
    proba: bool,
    wait: bool,
    data: Path,
) -> None:
    """Encrypt the CSV file DATA into JSON Lines in S3, run a Batch Transform job, then decrypt its answers."""
    import boto3

    from fhe_bento.client.batch_transform import input_url, output_url, start_transform

    model = _batch_model(model_name, models, key_endpoint)
    _, rows = _csv_rows(data)
    job = start_transform(
        model,
        np.array(list(rows)),
        job_name=job_name,
        model_name=sagemaker_model,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        instance_type=instance_type,
        instance_count=instance_count,
        s3=boto3.client("s3"),
    )
    click.echo(f"started transform job {job_name}: {input_url(job)} -> {output_url(job)}", err=True)
    if wait:
        _results(model, job.name, output, proba)


@sagemaker.command("batch-results")
@_model_options
@click.option("--job-name", required=True)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write (default stdout)."
)
@click.option("--proba", is_flag=True, help="Write class probabilities instead of labels.")
def batch_results(
    model_name: str, models: str, key_endpoint: str | None, job_name: str, output: Path | None, proba: bool
) -> None:
    """Wait for a Batch Transform job, then decrypt its answers into a CSV."""
    _results(_batch_model(model_name, models, key_endpoint), job_name, output, proba)


def _results(model, job_name: str, output: Path | None, proba: bool) -> None:
    import boto3

    from fhe_bento.client.batch_transform import transform_results

    results = transform_results(model, job_name, s3=boto3.client("s3"))
    if failed := _write_results(model, results, output, proba):
        click.echo(f"{failed} of {len(results)} rows failed (error lines in the output)", err=True)


def _numeric(row: list[str]) -> bool:
    try:
        [float(value) for value in row]
    except ValueError:
        return False
    return True


def _csv_rows(path: Path) -> tuple[int, Iterator[np.ndarray]]:
    """(row count, rows read lazily) of a numeric CSV with or without one header line."""
    with path.open(newline="") as fh:
        records = (row for row in csv.reader(fh) if row)
        first = next(records, None)
        has_header = first is not None and not _numeric(first)
        total = sum(1 for _ in records) + (1 if first is not None and not has_header else 0)

    def rows() -> Iterator[np.ndarray]:
        with path.open(newline="") as fh:
            records = (row for row in csv.reader(fh) if row)
            if has_header:
                next(records)
            for row in records:
                yield np.array(row, dtype=float)

    return total, rows()
