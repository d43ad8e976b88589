"""A served TFHE-rs row against concrete-ml's own `FHEModelServer.run` of the same row, in one run.

    .venv/bin/python bench/tfhe_rs.py [--rows 5]

On the TFHE-rs demo (breast-cancer-xgb-tfhe-rs: an 8-bit XGB of 3 trees on 4 features, rows and results as
TFHE-rs radix ciphertexts), a server with one engine process (FHE_BENTO_ROW_THREADS=1: the engine gets
every core, as the in-process run does). Reports, as ratios and bytes:
- median served row (client -> HTTP -> radix layout check -> engine -> bridge -> FHE -> answer) / median
  in-process run (concrete-ml's server, its bridge restored, pre-deserialized key) on the same rows;
- the time of the radix layout check alone, per row;
- bytes on the wire per row: the radix ciphertext up, the radix result down.
Results go to stdout (markdown) and bench/results/tfhe_rs.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import post_predict, report, throwaway_home


def in_process(model_path: Path, key: bytes, rows: list[bytes]) -> list[float]:
    from concrete import fhe

    from fhe_bento.runners import fhe_server

    server = fhe_server.load_server(model_path, tfhe_rs=True)
    evaluation_key = fhe.EvaluationKeys.deserialize(key)
    fhe_server.run(server, rows[0], evaluation_key)  # warm-up, as the served side is warm
    times = []
    for row in rows:
        started = time.perf_counter()
        fhe_server.run(server, row, evaluation_key)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5)
    args = parser.parse_args()

    home = throwaway_home()
    import bentoml
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.checks.payloads import check_radix
    from fhe_bento.client.http_transport import HTTPTransport
    from fhe_bento.modelkit.demo import TFHE_RS_NAME, build_and_import_tfhe_rs, four_features
    from fhe_bento.models.repository import load_folder
    from harness.devserver import Server

    build_and_import_tfhe_rs()
    model_path = Path(bentoml.models.get(f"{TFHE_RS_NAME}:latest").path)
    fhe = FHEModelClient(str(model_path), key_dir=tempfile.mkdtemp(dir=home))
    key = fhe.get_serialized_evaluation_keys()  # once: a second call would make another radix key
    x = four_features().x_test
    rows = [fhe.quantize_encrypt_serialize(x[i : i + 1])[0] for i in range(args.rows + 1)]
    layout = load_folder(model_path, TFHE_RS_NAME).meta.radix
    assert layout is not None
    started = time.perf_counter()
    for row in rows:
        check_radix(row, layout, TFHE_RS_NAME)
    check_seconds = (time.perf_counter() - started) / len(rows)

    workdir = home / "bench"
    workdir.mkdir()
    server = Server(
        workdir,
        {
            "FHE_BENTO_MODELS": f"{TFHE_RS_NAME}:latest",
            "FHE_BENTO_KEY_STORE": (workdir / "keys").as_uri(),
            "FHE_BENTO_ROW_THREADS": "1",
        },
    )
    server.start()
    try:
        key_id = HTTPTransport(server.url).put_key(TFHE_RS_NAME, key, lambda _: None)["key_id"]
        post_predict(server.url, key_id, rows[0], TFHE_RS_NAME)  # loads the key into the engine
        served, down = [], []
        for row in rows[1:]:
            seconds, answer = post_predict(server.url, key_id, row, TFHE_RS_NAME)
            served.append(seconds)
            down.append(len(answer))
    finally:
        server.stop()
    baseline = in_process(model_path, key, rows[1:])

    results = {
        "cores": os.cpu_count(),
        "rows": args.rows,
        "in_process_median_s": statistics.median(baseline),
        "served_median_s": statistics.median(served),
        "served_over_in_process": statistics.median(served) / statistics.median(baseline),
        "radix_check_ms_per_row": check_seconds * 1000,
        "row_request_bytes": len(rows[1]),
        "row_answer_bytes": statistics.mean(down),
        "evaluation_key_bytes": len(key),
    }
    report("tfhe_rs", results)


if __name__ == "__main__":
    main()
