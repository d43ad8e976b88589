"""Serving overhead of fhe-bento on the XGB demo model, measured side by side in one run.

    .venv/bin/python bench/latency.py [--rows 5] [--clients 4]

Reports, as ratios:
- median served latency (client -> HTTP -> runner -> FHE -> back) / median in-process
  `FHEModelServer.run` with a pre-deserialized key, on the same ciphertexts;
- cold-key (key cache disabled: read + deserialize each request) / warm-key served latency;
- /ping p50 and p99 while N clients predict;
- bytes on the wire per prediction against the ciphertext sizes.
Results go to stdout (markdown) and bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from common import MODEL, post_predict, report, setup_home, start_server


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def in_process(model_path: Path, key: bytes, ciphertexts: list[bytes]) -> list[float]:
    from concrete import fhe
    from concrete.ml.deployment import FHEModelServer

    server = FHEModelServer(str(model_path))
    evaluation_key = fhe.EvaluationKeys.deserialize(key)
    server.run(ciphertexts[0], evaluation_key)  # warm-up, as the served side is warm
    times = []
    for ciphertext in ciphertexts:
        started = time.perf_counter()
        server.run(ciphertext, evaluation_key)
        times.append(time.perf_counter() - started)
    return times


def ping_under_load(url: str, key_id: str, ciphertexts: list[bytes], clients: int) -> tuple[list[float], int]:
    stop = threading.Event()
    pings: list[float] = []

    def pinger() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                started = time.perf_counter()
                assert http.get(f"{url}/ping").status_code == 200
                pings.append(time.perf_counter() - started)
                time.sleep(0.05)

    thread = threading.Thread(target=pinger)
    work = [ciphertexts[i % len(ciphertexts)] for i in range(clients * 2)]
    with ThreadPoolExecutor(clients) as pool:
        thread.start()
        list(pool.map(lambda ct: post_predict(url, key_id, ct), work))
        stop.set()
    thread.join()
    return pings, len(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()

    home = setup_home()
    import bentoml

    from fhe_bento.client import FHEClient
    from fhe_bento.modelkit.demo import load_data

    model_path = Path(bentoml.models.get(f"{MODEL}:latest").path)
    workdir = home / "bench"
    store = (workdir / "keys").as_uri()
    warm = start_server(workdir / "warm", store)
    try:
        client = FHEClient(warm.url, cache_dir=workdir / "client", progress=False)
        remote = client.model(MODEL)
        key_id = remote.ensure_key()
        key = remote.evaluation_key()
        ciphertexts = remote.encrypt(load_data().x_test[: args.rows])

        baseline = in_process(model_path, key, ciphertexts)
        post_predict(warm.url, key_id, ciphertexts[0])  # warm the runner's key cache
        served, answers = zip(*(post_predict(warm.url, key_id, ct) for ct in ciphertexts), strict=False)
        pings, loaded = ping_under_load(warm.url, key_id, ciphertexts, args.clients)
    finally:
        warm.stop()
    cold_server = start_server(workdir / "cold", store, FHE_BENTO_KEY_CACHE_BYTES="0")
    try:
        cold = [post_predict(cold_server.url, key_id, ct)[0] for ct in ciphertexts]
    finally:
        cold_server.stop()

    results = {
        "cores": os.cpu_count(),
        "rows": args.rows,
        "in_process_median_s": statistics.median(baseline),
        "served_median_s": statistics.median(served),
        "served_over_in_process": statistics.median(served) / statistics.median(baseline),
        "cold_key_median_s": statistics.median(cold),
        "cold_over_warm": statistics.median(cold) / statistics.median(served),
        "ping_clients": args.clients,
        "ping_requests_under_load": loaded,
        "ping_p50_ms": percentile(pings, 50) * 1000,
        "ping_p99_ms": percentile(pings, 99) * 1000,
        "ping_samples": len(pings),
        "ciphertext_in_bytes": statistics.mean(len(ct) for ct in ciphertexts),
        "ciphertext_out_bytes": statistics.mean(len(a) for a in answers),
        "evaluation_key_bytes": len(key),
    }
    report("latency", results)


if __name__ == "__main__":
    main()
