"""The data owner's commands of the `fhe-bento` command line: list a server's models, predict a CSV.
The model owner's commands (import, demo models, SageMaker) are in `modelkit.cli`."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np


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
    from fhe_bento.client.api import FHEClient

    model = FHEClient(url, batch_size=batch_size, concurrency=concurrency, token=token).model(model_name)
    total, rows = _csv_rows(data)
    with click.open_file(str(output) if output else "-", "w") as out:
        for scores in model.predict_proba_stream(rows, total=total):
            values = scores if proba else model.labels(scores.reshape(1, -1))
            out.write(",".join(f"{v:.10g}" if isinstance(v, float) else str(v) for v in np.ravel(values)) + "\n")


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
