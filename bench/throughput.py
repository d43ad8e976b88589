"""Throughput, latency, health under load, wire bytes and cold start, side by side in one run; writes
docs/benchmarks.md and PNG plots. Run it with `bench/run` (installs matplotlib).

Execution models compared (workers x rows at once per worker x OpenMP threads per row):
- `1x1xN`: one worker, one row at a time, concrete's OpenMP loops over all N cores (the default);
- `1xNx1`: one worker, N rows at once on threads, one OpenMP thread per row;
- `Nx1x1`: N worker processes, one row each, one OpenMP thread per row.
The in-process ideal is a plain Python loop over `FHEModelServer.run` with a pre-deserialized key, threaded
to the core count. It is measured on the same rows right before each served level, and each level's
ratio is taken against that neighbour, so that the drift of a shared machine cancels out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from common import MODEL, ROOT, post_predict, report, setup_home, start_server, write_sections

CLIENT_LEVELS = (1, 2, 4, 8)


class InProcess:
    """concrete-ml's own server in this process: the floor that serving is measured against."""

    def __init__(self, model_path: Path, key: bytes, cores: int) -> None:
        from concrete import fhe
        from concrete.ml.deployment import FHEModelServer

        self.server = FHEModelServer(str(model_path))
        self.key = fhe.EvaluationKeys.deserialize(key)
        self.cores = cores

    def latency(self, ciphertext: bytes) -> float:
        started = time.perf_counter()
        self.server.run(ciphertext, self.key)
        return time.perf_counter() - started

    def rows_per_s(self, rows: list[bytes]) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(self.cores) as pool:
            list(pool.map(lambda ct: self.server.run(ct, self.key), rows))
        return len(rows) / (time.perf_counter() - started)


def level_rows(ciphertexts: list[bytes], clients: int) -> list[bytes]:
    return [ciphertexts[i % len(ciphertexts)] for i in range(max(4, clients))]


def load_level(url: str, key_id: str, rows: list[bytes], clients: int, ping: bool) -> dict:
    """`clients` threads each send their share of rows as single predictions, back to back."""
    latencies: list[float] = []
    pings: list[float] = []
    done = threading.Event()

    def pinger() -> None:
        with httpx.Client(timeout=10) as http:
            while not done.is_set():
                started = time.perf_counter()
                http.get(f"{url}/ping").raise_for_status()
                pings.append(time.perf_counter() - started)
                time.sleep(0.05)

    def client(share: list[bytes]) -> None:
        for ciphertext in share:
            latencies.append(post_predict(url, key_id, ciphertext)[0])

    thread = threading.Thread(target=pinger)
    if ping:
        thread.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [rows[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - started
    done.set()
    if ping:
        thread.join()
    result = {
        "clients": clients,
        "rows": len(rows),
        "rows_per_s": len(rows) / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
    }
    if ping:
        result["ping_p99_ms"] = float(np.percentile(pings, 99)) * 1000
        result["ping_samples"] = len(pings)
    return result


def wire_bytes(url: str, key_id: str, ciphertext: bytes, key_bytes: int) -> dict:
    response = httpx.post(
        f"{url}/v1/models/{MODEL}/predict",
        content=ciphertext,
        timeout=600,
        headers={"Content-Type": "application/octet-stream", "X-FHE-Key-Id": key_id},
    )
    request_line = len(f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\n")
    headers = sum(len(k) + len(v) + 4 for k, v in response.request.headers.raw) + request_line + 2
    headers += sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + len("HTTP/1.1 200 OK\r\n") + 2
    registered = headers + len(ciphertext) + len(response.content)
    return {
        "ciphertexts": len(ciphertext) + len(response.content),
        "registered_key": registered,
        "key_per_request": registered + key_bytes,
    }


def image_figures(image: str) -> dict:
    size = int(
        subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    from fhe_bento.modelkit.sagemaker_deploy import model_folders_from_store, write_model_dir

    models = write_model_dir(
        model_folders_from_store([f"{MODEL}:latest"]), Path(os.environ["BENTOML_HOME"]) / "opt-ml"
    )
    started = time.perf_counter()
    name = f"fhe-bench-{os.getpid()}"
    subprocess.run(
        [
            "podman",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=4096:4096",
            "-e",
            "PORT=8080",
            "-v",
            f"{models}:/opt/ml/model:ro",
            image,
            "serve",
        ],
        check=True,
        capture_output=True,
    )
    try:
        while True:
            try:
                if httpx.get("http://127.0.0.1:8080/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return {"image_bytes": size, "image_cold_start_to_ping_s": time.perf_counter() - started}
    finally:
        subprocess.run(["podman", "stop", name], capture_output=True)


def plot(levels: dict[str, list[dict]], ideal: dict, cores: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, results in levels.items():
        clients = [r["clients"] for r in results]
        left.plot(clients, [r["rows_per_s"] for r in results], marker="o", label=f"served {name}")
        right.plot(clients, [r["p50_s"] for r in results], marker="o", label=f"p50 {name}")
        right.plot(clients, [r["p99_s"] for r in results], marker="x", linestyle="--", label=f"p99 {name}")
    left.axhline(ideal["rows_per_s"], color="black", linestyle=":", label="in-process ideal")
    right.axhline(ideal["latency_s"], color="black", linestyle=":", label="in-process, one row")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(CLIENT_LEVELS, labels=[str(c) for c in CLIENT_LEVELS])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
    left.set(ylabel="rows / s", title=f"XGB throughput ({cores} cores)")
    right.set(ylabel="seconds", title="latency per row")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="also measure this image's size and cold start (podman)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    home = setup_home()
    import bentoml

    from fhe_bento.client import FHEClient
    from fhe_bento.modelkit.demo import load_data

    model_path = Path(bentoml.models.get(f"{MODEL}:latest").path)
    store = (home / "keys").as_uri()
    configs = {
        f"1x1x{cores}": {},
        f"1x{cores}x1": {"FHE_BENTO_ROW_THREADS": str(cores)},
        f"{cores}x1x1": {"FHE_BENTO_WORKERS": str(cores)},
    }
    levels: dict[str, list[dict]] = {}
    figures: dict = {"cores": cores}
    for index, (name, env) in enumerate(configs.items()):
        started = time.perf_counter()
        server = start_server(home / name, store, **env)
        to_ping = time.perf_counter() - started
        try:
            remote = FHEClient(server.url, cache_dir=home / "client", progress=False).model(MODEL)
            key_id = remote.ensure_key()
            if index == 0:
                key = remote.evaluation_key()
                ciphertexts = remote.encrypt(load_data().x_test[:8])
                first = post_predict(server.url, key_id, ciphertexts[0])[0]
                in_process = InProcess(model_path, key, cores)
                in_process.latency(ciphertexts[0])  # warm-up
                latencies = {"in_process": [], "served": []}
                for ciphertext in ciphertexts[1:5]:  # one client, interleaved
                    latencies["in_process"].append(in_process.latency(ciphertext))
                    latencies["served"].append(post_predict(server.url, key_id, ciphertext)[0])
                figures.update({"cold_start_to_ping_s": to_ping, "first_prediction_s": first})
                figures.update(
                    {
                        f"wire_{k}": v
                        for k, v in wire_bytes(server.url, key_id, ciphertexts[0], len(key)).items()
                    }
                )
            else:
                post_predict(server.url, key_id, ciphertexts[0])  # warm every worker's key cache once
            levels[name] = []
            for clients in CLIENT_LEVELS:
                rows = level_rows(ciphertexts, clients)
                ideal = in_process.rows_per_s(rows)
                result = load_level(server.url, key_id, rows, clients, ping=clients == CLIENT_LEVELS[-1])
                levels[name].append(
                    {**result, "ideal_rows_per_s": ideal, "over_ideal": result["rows_per_s"] / ideal}
                )
        finally:
            server.stop()
    ideal = {
        "rows_per_s": statistics.median(r["ideal_rows_per_s"] for rs in levels.values() for r in rs),
        "latency_s": statistics.median(latencies["in_process"]),
    }
    if args.image:
        figures.update(image_figures(args.image))

    best_name = next(iter(levels))  # the default execution model, at its best concurrency
    best = max(levels[best_name], key=lambda r: r["rows_per_s"])
    figures.update(
        {
            "ideal_rows_per_s": ideal["rows_per_s"],
            "ideal_latency_s": ideal["latency_s"],
            "served_latency_s": statistics.median(latencies["served"]),
            "best_config": best_name,
            "best_clients": best["clients"],
            "best_rows_per_s": best["rows_per_s"],
            "best_ideal_rows_per_s": best["ideal_rows_per_s"],
            "throughput_over_ideal": best["over_ideal"],
            "p50_one_client_over_in_process": statistics.median(latencies["served"]) / ideal["latency_s"],
            "ping_p99_ms_full_load": max(rs[-1]["ping_p99_ms"] for rs in levels.values()),
            "wire_over_ciphertexts": figures["wire_registered_key"] / figures["wire_ciphertexts"],
            "key_per_request_over_registered": figures["wire_key_per_request"]
            / figures["wire_registered_key"],
        }
    )
    docs = ROOT / "docs"
    (docs / "img").mkdir(parents=True, exist_ok=True)
    plot(levels, ideal, cores, docs / "img" / "throughput.png")
    report("throughput", {**figures, "levels": levels})
    write_markdown(docs / "benchmarks.md", figures, levels)


def write_markdown(path: Path, f: dict, levels: dict[str, list[dict]]) -> None:
    rows = "\n".join(
        f"| {name} | {r['clients']} | {r['rows']} | {r['rows_per_s']:.3f} | {r['ideal_rows_per_s']:.3f} | {r['over_ideal']:.2f}"
        f" | {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
        for name, results in levels.items()
        for r in results
    )
    image = ""
    if "image_bytes" in f:
        image = (
            f"| image size | {f['image_bytes'] / 1e9:.2f} GB | |\n"
            f"| image: `podman run ... serve` to first `/ping` 200 | {f['image_cold_start_to_ping_s']:.1f} s | |\n"
        )
    preamble = f"""# Benchmarks

Produced by `bench/run` (`bench/throughput.py`) in one run on one machine with **{f["cores"]} cores**, on the
XGB demo model (10 trees, depth 3, 6 bits). Execution models are named workers x rows at once per worker x
OpenMP threads per row; the first is the default. Each
served level is paired with the in-process ideal measured on the same rows just before it, and its ratio
is taken against that neighbour, so that the drift of a shared machine cancels out. "Summary", "Every
level" and "Single figures" come from that run; rerun `bench/run` to refresh them. Every other section
names the benchmark that produced it, among them "Cheap circuits" (`bench/cheap.py`: what serving costs
where a row takes milliseconds) and "Hybrid models" (`bench/hybrid.py`).

![throughput and latency](img/throughput.png)
"""
    summary = f"""| figure | value | target |
| --- | --- | --- |
| in-process ideal (plain loop over `FHEModelServer.run`, {f["cores"]} threads), median of its rounds | {f["ideal_rows_per_s"]:.3f} rows/s | |
| best served throughput ({f["best_config"]}, {f["best_clients"]} clients) against its paired ideal | {f["best_rows_per_s"]:.3f} / {f["best_ideal_rows_per_s"]:.3f} rows/s | |
| **served / ideal throughput** | **{f["throughput_over_ideal"]:.2f}** | ≥ 0.95 |
| median latency of one row, in-process / served (interleaved, one client) | {f["ideal_latency_s"]:.2f} s / {f["served_latency_s"]:.2f} s | |
| **p50 served latency, one client / in-process latency** | **{f["p50_one_client_over_in_process"]:.2f}** | ≤ 1.05 |
| **`/ping` p99 at 8 clients** | **{f["ping_p99_ms_full_load"]:.1f} ms** | < 100 ms |
| bytes on the wire per row, key registered (bodies + HTTP headers) | {f["wire_registered_key"]:,} B | |
| ciphertexts alone (in + out) | {f["wire_ciphertexts"]:,} B | |
| **wire / ciphertexts** | **{f["wire_over_ciphertexts"]:.3f}** | ≤ 1.05 |
| bytes per row when the key travels with every request (the original SageMaker sample) | {f["wire_key_per_request"]:,} B ({f["key_per_request_over_registered"]:.0f}x) | |
| `bentoml serve` start to first `/ping` 200 | {f["cold_start_to_ping_s"]:.1f} s | < 15 s |
| then the first prediction (cold key: read + deserialize) | {f["first_prediction_s"]:.1f} s | |
{image}"""
    every = f"""| execution model | clients | rows | rows/s | in-process ideal, measured just before | / ideal | p50 s | p99 s |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
"""
    write_sections(path, {"Summary": summary, "Every level": every}, preamble)


if __name__ == "__main__":
    main()
