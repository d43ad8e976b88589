"""Key registry costs on a shared s3:// store (moto's server mode on 127.0.0.1), XGB demo model.

    .venv/bin/python bench/keys.py [--rows 3]

Reports:
- upload throughput of the 59 MB evaluation key in 5 MiB parts through the HTTP part routes into S3;
- cold-key request (key cache off: S3 GET of the key + deserialize, every request) against a warm one
  (deserialized key in the worker cache), on the same ciphertexts.
Results go to stdout (markdown) and bench/results/keys.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import MODEL, post_predict, report, setup_home, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3)
    args = parser.parse_args()

    home = setup_home()
    import boto3

    from fhe_bento.client import FHEClient
    from fhe_bento.client.http_transport import HTTPTransport
    from fhe_bento.modelkit.demo import load_data
    from harness.devserver import MotoServer

    moto = MotoServer()
    os.environ.update(moto.env())
    boto3.client("s3").create_bucket(Bucket="bench-keys")
    store = "s3://bench-keys/keys"
    servers = []
    try:
        warm = start_server(home / "warm", store)
        servers.append(warm)
        remote = FHEClient(warm.url, cache_dir=home / "client", progress=False).model(MODEL)
        key = remote.evaluation_key()
        started = time.perf_counter()
        answer = HTTPTransport(warm.url).put_key(MODEL, key, lambda _: None)
        upload_s = time.perf_counter() - started
        key_id = answer["key_id"]
        ciphertexts = remote.encrypt(load_data().x_test[: args.rows])

        post_predict(warm.url, key_id, ciphertexts[0])  # the registering worker cached it; make sure
        warm_times = [post_predict(warm.url, key_id, ct)[0] for ct in ciphertexts]
        cold = start_server(home / "cold", store, FHE_BENTO_KEY_CACHE_BYTES="0")
        servers.append(cold)
        cold_times = [post_predict(cold.url, key_id, ct)[0] for ct in ciphertexts]
    finally:
        for server in servers:
            server.stop()
        moto.stop()

    report(
        "keys",
        {
            "cores": os.cpu_count(),
            "key_bytes": len(key),
            "parts": -(-len(key) // (5 * 1024 * 1024)),
            "upload_seconds": upload_s,
            "upload_MB_per_s": len(key) / upload_s / 1e6,
            "warm_median_s": statistics.median(warm_times),
            "cold_median_s": statistics.median(cold_times),
            "cold_over_warm": statistics.median(cold_times) / statistics.median(warm_times),
            "cold_extra_s": statistics.median(cold_times) - statistics.median(warm_times),
        },
    )


if __name__ == "__main__":
    main()
