"""A served training step against concrete-ml's own `FHEModelServer.run` of the same step, in one run.

    .venv/bin/python bench/training.py [--steps 5]

On the training demo (breast-cancer-training: batches of 4, 4 features, 5-bit training values), a server
with one engine process (FHE_BENTO_ROW_THREADS=1: the engine gets every core, as the in-process run does)
and a `file://` key store. Reports, as ratios and bytes:
- median served step (client -> HTTP -> checks -> engine -> FHE -> the step's durable write -> answer) /
  median in-process `FHEModelServer.run` with a pre-deserialized key, on the same batches and weights;
- bytes on the wire per step (the batch up, a small JSON down), against the weights the server holds,
  which travel only at the start (the client's initial weights) and the end (`GET .../weights`).
Results go to stdout (markdown) and bench/results/training.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import report, throwaway_home

BATCH = {"Content-Type": "application/vnd.fhe-bento.batch"}


def in_process(model_path: Path, key: bytes, batches: list[list[bytes]], weights: list[bytes]) -> list[float]:
    from concrete import fhe
    from concrete.ml.deployment import FHEModelServer

    server = FHEModelServer(str(model_path))
    evaluation_key = fhe.EvaluationKeys.deserialize(key)
    held = tuple(weights)
    server.run((*batches[0], *held), evaluation_key)  # warm-up, as the served side is warm
    times = []
    for batch in batches:
        started = time.perf_counter()
        held = server.run((*batch, *held), evaluation_key)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    home = throwaway_home()
    import bentoml
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.client.http_transport import HTTPTransport
    from fhe_bento.client.training import initial_weights
    from fhe_bento.modelkit.demo import TRAINING_NAME, build_and_import_training, training_data
    from fhe_bento.protocol import wire
    from harness.devserver import Server

    build_and_import_training()
    model_path = Path(bentoml.models.get(f"{TRAINING_NAME}:latest").path)
    data = training_data()
    fhe = FHEModelClient(str(model_path), key_dir=tempfile.mkdtemp(dir=home))
    fhe.generate_private_and_evaluation_keys()
    key = fhe.get_serialized_evaluation_keys()
    _, _, w, b = fhe.quantize_encrypt_serialize(None, None, *initial_weights(4, (-1.0, 1.0), 0))
    batches = []
    for step in range(args.steps + 1):
        rows = slice(4 * step, 4 * step + 4)
        x, y, _, _ = fhe.quantize_encrypt_serialize(
            data.x_train[rows].reshape(1, 4, 4), data.y_train[rows].reshape(1, 4, 1).astype(float), None, None
        )
        batches.append([x, y])

    workdir = home / "bench"
    workdir.mkdir()
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{TRAINING_NAME}:latest",
            "FHE_BENTO_KEY_STORE": (workdir / "keys").as_uri(),
            "FHE_BENTO_ROW_THREADS": "1",
        },
    )
    server.start()
    try:
        http = httpx.Client(base_url=server.url, timeout=600)
        key_id = HTTPTransport(server.url, client=http).put_key(TRAINING_NAME, key, lambda _: None)["key_id"]
        start_body = wire.encode_batch([w, b])
        answer = http.post(
            f"/v1/models/{TRAINING_NAME}/trainings",
            content=start_body,
            headers={**BATCH, "X-FHE-Key-Id": key_id},
        )
        training_id = answer.json()["training_id"]
        served, up, down = [], [], []
        for step, batch in enumerate(batches):
            body = wire.encode_batch(batch)
            started = time.perf_counter()
            response = http.post(
                f"/v1/models/{TRAINING_NAME}/trainings/{training_id}/steps",
                params={"step": step},
                content=body,
                headers=BATCH,
            )
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if step:  # the first step loads the key into the engine: the in-process side warms up too
                served.append(elapsed)
            up.append(len(body))
            down.append(len(response.content))
        weights = http.get(f"/v1/models/{TRAINING_NAME}/trainings/{training_id}/weights").content
    finally:
        server.stop()
    baseline = in_process(model_path, key, batches[1:], [w, b])

    results = {
        "cores": os.cpu_count(),
        "steps": args.steps,
        "in_process_median_s": statistics.median(baseline),
        "served_median_s": statistics.median(served),
        "served_over_in_process": statistics.median(served) / statistics.median(baseline),
        "step_request_bytes": statistics.mean(up),
        "step_answer_bytes": statistics.mean(down),
        "start_request_bytes": len(start_body),
        "final_weights_bytes": len(weights),
        "evaluation_key_bytes": len(key),
    }
    report("training", results)


if __name__ == "__main__":
    main()
