"""The `fhe-bento` command line: model import and demo for model owners, CSV prediction for clients."""

from __future__ import annotations

import sys
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
def models(url: str) -> None:
    """List the models a server serves."""
    from client.http_transport import HTTPTransport

    for info in HTTPTransport(url).list_models():
        click.echo(f"{info['name']}:{info['version']}  {info['model_class']}  features={info['n_features']}  "
                   f"needs_key={info['needs_key']}")


@main.command("predict")
@click.option("--url", required=True, envvar="FHE_BENTO_URL", help="Server URL.")
@click.option("--model", "model_name", required=True, help="Served model name.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="CSV to write (default stdout).")
@click.option("--proba", is_flag=True, help="Write class probabilities instead of labels.")
@click.option("--batch-size", default=8, show_default=True, help="Rows per request.")
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight.")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def predict(url: str, model_name: str, output: Path | None, proba: bool, batch_size: int, concurrency: int,
            data: Path) -> None:
    """Encrypt each row of the CSV file DATA, predict on the server, and write the decrypted answers."""
    from client.api import FHEClient

    rows = _read_csv(data)
    model = FHEClient(url, batch_size=batch_size, concurrency=concurrency).model(model_name)
    result = model.predict_proba(rows) if proba else model.predict(rows)
    np.savetxt(output or sys.stdout, np.atleast_2d(result.T).T, delimiter=",", fmt="%.10g")


def _read_csv(path: Path) -> np.ndarray:
    """Numeric CSV, with or without one header line."""
    with path.open() as fh:
        first = fh.readline()
    has_header = any(c.isalpha() for c in first.replace("e", "").replace("E", ""))
    return np.atleast_2d(np.loadtxt(path, delimiter=",", skiprows=1 if has_header else 0, dtype=np.float64))


def _label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text
