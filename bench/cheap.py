"""Cheap circuits: what serving costs where FHE takes milliseconds, measured side by side in one run.

    .venv/bin/python bench/cheap.py [--rows 400] [--profile-seconds 15] [--smoke]

Two models whose rows take a few milliseconds: the demo logistic regression, and one linear layer
(16 to 32) of a concrete-ml `HybridFHEModel`, saved with `save_and_clear_private_info` and imported with
`fhe-bento import`. For each, on the same ciphertext (the client reuses one, so no client-side crypto is
counted):
- in process: `FHEModelServer.run` in a loop (one thread: latency and CPU per row; two threads:
  throughput), OpenMP at one thread per row as in the served execution model;
- served by fhe-bento (`bentoml serve`, one worker, two engine processes of one OpenMP thread each): one
  client (latency, server CPU per row: every process of the server's tree), then 8 clients (throughput);
- served by a server built like Zama's reference deployment server (`bench/reference_server.py`);
- with `--profile-seconds`, where fhe-bento's server CPU goes, stage by stage (py-spy samples of every
  server process while one client sends rows).
The clients are raw `http.client` connections with prebuilt bodies, the cheapest client there is, so that
the machine's two cores go to the servers. Writes bench/results/cheap.json and the "Cheap circuits"
section of docs/benchmarks.md (`--smoke`: a few rows, no report).
"""

from __future__ import annotations

import argparse
import ast
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import ROOT, report, throwaway_home, write_sections

LOGREG = "breast-cancer-logreg"
HYBRID = "hybrid-linear"
CLIENTS = 8
ENGINE_ENV = {"FHE_BENTO_WORKERS": "1", "FHE_BENTO_ROW_THREADS": "2", "FHE_BENTO_OMP_THREADS": "1"}


def import_models() -> dict[str, Path]:
    """The two models in the model store: name -> folder."""
    import bentoml
    import torch
    from concrete.ml.torch.hybrid_model import HybridFHEModel

    from fhe_bento.modelkit.demo import build_and_import
    from fhe_bento.modelkit.importer import import_model

    build_and_import([LOGREG])

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 32)
            self.out = torch.nn.Linear(32, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    hybrid = HybridFHEModel(Block(), ["fc"])
    hybrid.compile_model(torch.randn(64, 16), n_bits=8)
    saved = Path(tempfile.mkdtemp(prefix="hybrid-"))
    hybrid.save_and_clear_private_info(saved)
    (shape_dir,) = (saved / "fc").iterdir()
    import_model(shape_dir, HYBRID)
    return {name: Path(bentoml.models.get(f"{name}:latest").path) for name in (LOGREG, HYBRID)}


@dataclass
class Row:
    """One model's ciphertext, and its evaluation key (serialized) as the client would upload it."""

    ciphertext: bytes
    key: bytes


def client_row(folder: Path, keys: Path) -> Row:
    import numpy as np
    from concrete.ml.deployment import FHEModelClient

    from fhe_bento.modelkit.importer import circuit_shape

    client = FHEModelClient(str(folder), key_dir=str(keys))
    client.generate_private_and_evaluation_keys()
    shape = ast.literal_eval(circuit_shape(folder))  # (1, features), or a hybrid circuit's (1, *rest)
    ciphertext = client.quantize_encrypt_serialize(np.random.default_rng(0).normal(size=shape))
    return Row(ciphertext, client.get_serialized_evaluation_keys())


# --- in process -------------------------------------------------------------------------------------


class InProcess:
    """`FHEModelServer.run` in this process, as an engine runs it: one OpenMP thread per row."""

    def __init__(self, folder: Path, row: Row) -> None:
        from concrete import fhe
        from concrete.ml.deployment import FHEModelServer
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="openmp")
        self.server = FHEModelServer(str(folder))
        self.ciphertext = row.ciphertext
        self.key = fhe.EvaluationKeys.deserialize(row.key)
        for _ in range(20):  # warm-up
            self.run()

    def run(self, _: object = None) -> None:
        self.server.run(self.ciphertext, self.key)

    def measure(self, rows: int) -> dict[str, float]:
        """One thread (latency, CPU per row), then two (throughput)."""
        latencies = []
        cpu = time.process_time()
        for _ in range(rows):
            started = time.perf_counter()
            self.run()
            latencies.append(time.perf_counter() - started)
        cpu_per_row = (time.process_time() - cpu) / rows
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self.run, range(rows)))
        return {
            "latency_ms": 1000 * statistics.median(latencies),
            "cpu_ms_per_row": 1000 * cpu_per_row,
            "rows_per_s_2_threads": rows / (time.perf_counter() - started),
        }


# --- served -----------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """A served model: where to POST, with what body and headers."""

    port: int
    path: str
    body: bytes
    headers: dict[str, str]
    pid: int  # the server's top process
    worker_pid: int | None = None  # fhe-bento's worker: HTTP, checks and the engines' supervisor
    method: str = "POST"


def tree_cpu(pid: int, recursive: bool = True) -> float:
    """CPU seconds so far of a process and (`recursive`) all its descendants alive."""
    import psutil

    top = psutil.Process(pid)
    total = 0.0
    for proc in [top, *(top.children(recursive=True) if recursive else [])]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of a process."""
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def load(endpoint: Endpoint, rows: int, clients: int, pause: float = 0.0) -> dict[str, float]:
    """`rows` requests from `clients` connections at once (each client idle `pause` seconds between two of
    them): latency, throughput, server CPU per row, and the worker's, split into its event loop (the main
    thread: HTTP, checks) and its other threads (the engines' supervisors)."""
    remaining = iter(range(rows))
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=120)
        while True:
            with lock:
                if next(remaining, None) is None:
                    break
            started = time.perf_counter()
            conn.request(endpoint.method, endpoint.path, body=endpoint.body, headers=endpoint.headers)
            response = conn.getresponse()
            answer = response.read()
            assert response.status == 200, (response.status, answer[:300])
            latencies.append(time.perf_counter() - started)
            time.sleep(pause)
        conn.close()

    cpu = tree_cpu(endpoint.pid)
    thread_cpu_before = thread_cpu(endpoint.worker_pid) if endpoint.worker_pid else {}
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    figures = {
        "latency_ms": 1000 * statistics.median(latencies),
        "rows_per_s": rows / elapsed,
        "cpu_ms_per_row": 1000 * (tree_cpu(endpoint.pid) - cpu) / rows,
    }
    if endpoint.worker_pid:
        grown = {
            tid: cpu - thread_cpu_before.get(tid, 0.0) for tid, cpu in thread_cpu(endpoint.worker_pid).items()
        }
        loop = grown.get(endpoint.worker_pid, 0.0)  # the main thread's id is the process id
        figures["worker_cpu_ms_per_row"] = 1000 * sum(grown.values()) / rows
        figures["worker_loop_cpu_ms_per_row"] = 1000 * loop / rows
    return figures


def measure_served(endpoint: Endpoint, rows: int) -> dict[str, float]:
    """One client (latency, server CPU per row), then CLIENTS at once (throughput)."""
    one = load(endpoint, rows, 1)
    many = load(endpoint, rows, CLIENTS)
    return {
        **{k: one[k] for k in ("worker_cpu_ms_per_row", "worker_loop_cpu_ms_per_row") if k in one},
        "latency_ms": one["latency_ms"],
        "cpu_ms_per_row": one["cpu_ms_per_row"],
        "rows_per_s_8_clients": many["rows_per_s"],
        "cpu_ms_per_row_8_clients": many["cpu_ms_per_row"],
    }


def warm_up(endpoint: Endpoint, rows: int) -> None:
    load(endpoint, max(20, rows // 10), CLIENTS)  # connections, caches, engines


def paired(local: InProcess, endpoint: Endpoint, rows: int) -> dict[str, dict[str, float]]:
    """In process and served, measured in alternating blocks of `rows` / ROUNDS (this machine's speed
    drifts between minutes): the median of each figure over the rounds, for both."""
    warm_up(endpoint, rows)
    block = max(2, rows // ROUNDS)
    rounds: dict[str, list[dict[str, float]]] = {"in_process": [], "fhe_bento": []}
    for index in range(ROUNDS):
        order = ("in_process", "fhe_bento") if index % 2 == 0 else ("fhe_bento", "in_process")
        for where in order:
            figures = local.measure(block) if where == "in_process" else measure_served(endpoint, block)
            rounds[where].append(figures)
    return {
        where: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for where, runs in rounds.items()
    }


ROUNDS = 5


def multipart(fields: dict[str, bytes | str]) -> tuple[bytes, str]:
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata({k: (k, v) if isinstance(v, bytes) else v for k, v in fields.items()})


def reference_endpoint(folder: Path, row: Row, port: int) -> tuple[subprocess.Popen, Endpoint]:
    import httpx

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "reference_server.py"), str(folder), str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            uid = httpx.post(f"{url}/add_key", files={"key": row.key}, timeout=60).json()["uid"]
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline and proc.poll() is None, "the reference server did not start"
            time.sleep(0.5)
    body, content_type = multipart({"model_input": row.ciphertext, "uid": uid})
    return proc, Endpoint(port, "/compute", body, {"Content-Type": content_type}, proc.pid)


def ping_floor(server: Any, rows: int) -> dict[str, dict[str, float]]:
    """The worker's CPU for `GET /ping` (BentoML's and FastAPI's stack around a trivial operation), back to
    back and with each client idle for as long as a cheap row's FHE between two requests: what waking an
    idle worker adds to the same work."""
    endpoint = Endpoint(server.port, "/ping", b"", {}, server.proc.pid, server.worker().pid, method="GET")
    load(endpoint, 20, 1)
    return {
        "back_to_back": load(endpoint, rows, 1),
        "paused": load(endpoint, rows, 1, pause=ROW_PAUSE),
    }


ROW_PAUSE = 0.005  # seconds: about one cheap row's FHE


# --- where the CPU goes -----------------------------------------------------------------------------

# (stage, substrings of a sampled stack's frames): the first stage whose substring is in the stack wins.
STAGES = [
    ("FHE (concrete)", ("server.py", "concrete/fhe", "concrete/ml/deployment")),
    ("Cap'n Proto checks", ("checks/payloads", "capnp_wire")),
    (
        "runner-to-engine hop (supervisor, pipe, pickle)",
        ("runners/supervisor.py", "runners/engine_pipe.py", "multiprocessing/connection"),
    ),
    (
        "service-to-runner hop",
        ("runner_api", "_bentoml_sdk/method", "bentoml/_internal/client", "_bentoml_impl/client"),
    ),
    ("body reading", ("service/bodies",)),
    ("metrics and logs", ("prometheus_client", "logging/__init__", "opentelemetry")),
    ("operations and checks", ("fhe_bento/",)),
    (
        "HTTP and framework",
        ("uvicorn", "starlette", "fastapi", "_bentoml_impl", "bentoml", "h11", "httptools"),
    ),
]


def profile(pid: int, endpoint: Endpoint, seconds: int) -> dict[str, float]:
    """Share of the server's sampled CPU per stage, while one client sends rows for `seconds`."""
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),  # installed with the bench extra, beside this python
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "250",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        load(endpoint, 20, 1)
    spy.wait(timeout=seconds + 120)
    counts: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stage = next(
            (name for name, marks in STAGES if any(m in stack for m in marks)), "other (interpreter)"
        )
        counts[stage] += int(count)
    total = sum(counts.values()) or 1
    return {stage: counts[stage] / total for stage, _ in [*STAGES, ("other (interpreter)", ())]}


# --- the run ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--profile-seconds", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="a few rows, figures printed, no report")
    args = parser.parse_args()
    rows = 12 if args.smoke else args.rows
    home = throwaway_home()
    from harness.devserver import Server, free_port

    folders = import_models()
    row_of = {name: client_row(folder, home / "client-keys" / name) for name, folder in folders.items()}
    results: dict[str, Any] = {}
    local = {name: InProcess(folder, row_of[name]) for name, folder in folders.items()}

    server = Server(home / "server", {"FHE_BENTO_MODELS": f"{LOGREG}:latest,{HYBRID}:latest", **ENGINE_ENV})
    server.start()
    try:
        for name in folders:
            endpoint = Endpoint(
                server.port,
                f"/v1/models/{name}/predict",
                row_of[name].ciphertext,
                {"Content-Type": "application/octet-stream"},
                server.proc.pid,
                server.worker().pid,
            )
            results[name] = paired(local[name], endpoint, rows)
            if args.profile_seconds and not args.smoke:
                results[name]["stages"] = profile(server.proc.pid, endpoint, args.profile_seconds)
        results["ping"] = ping_floor(server, rows)
    finally:
        server.stop()

    for name, folder in folders.items():
        proc, endpoint = reference_endpoint(folder, row_of[name], free_port())
        try:
            warm_up(endpoint, rows)
            results[name]["reference"] = measure_served(endpoint, rows)
        finally:
            proc.terminate()
            proc.wait()

    flat = {f"{m}.{where}.{k}": v for m, r in results.items() for where, d in r.items() for k, v in d.items()}
    ping = results.pop("ping")
    if args.smoke:
        print(json.dumps(flat))  # the last line: what tests/test_bench.py reads
        return
    report("cheap", flat)
    write_sections(
        ROOT / "docs" / "benchmarks.md", {"Cheap circuits": markdown(results, ping, os.cpu_count() or 1)}
    )


GOALS = "server CPU per row <= 1.3x in process; one row <= in process + 2 ms; 8 clients >= 0.8 of in process"


def markdown(results: dict[str, Any], ping: dict[str, dict[str, float]], cores: int) -> str:
    lines = [
        f"Produced by `bench/cheap.py` in one run on {cores} cores: the demo logistic regression and one linear",
        "layer (16 to 32) of a concrete-ml `HybridFHEModel` imported with `fhe-bento import`, on one reused",
        "ciphertext. In process: `FHEModelServer.run` in a loop, one OpenMP thread per row. fhe-bento: one",
        "worker, two engine processes of one OpenMP thread (`FHE_BENTO_ROW_THREADS=2`, `FHE_BENTO_OMP_THREADS=1`).",
        "Reference: a server built like Zama's reference deployment server (`bench/reference_server.py`: one",
        "process, concrete's default OpenMP threads, no checks). Server CPU per row counts every process of the",
        "server, with one client; the worker's share is its HTTP stack, its checks and the engines' supervisor.",
        "Clients are raw `http.client` connections. In process and fhe-bento are measured in alternating",
        f"blocks, {ROUNDS} rounds, and each figure is the median of its rounds (this machine's speed drifts).",
        "Goals (issue 19): " + GOALS + ".",
        "",
        "| model | server | one row, ms | vs in process | server CPU per row, ms | / in process | of it, worker | "
        "8 clients, rows/s | / in process on 2 threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        base = r["in_process"]
        lines.append(
            f"| {name} | in process | {base['latency_ms']:.2f} | | {base['cpu_ms_per_row']:.2f} | | | "
            f"{base['rows_per_s_2_threads']:.0f} | |"
        )
        for where in ("fhe_bento", "reference"):
            s = r[where]
            worker = f"{s['worker_cpu_ms_per_row']:.2f}" if "worker_cpu_ms_per_row" in s else ""
            lines.append(
                f"| {name} | {where.replace('_', '-')} | {s['latency_ms']:.2f} | "
                f"+{s['latency_ms'] - base['latency_ms']:.2f} | {s['cpu_ms_per_row']:.2f} | "
                f"{s['cpu_ms_per_row'] / base['cpu_ms_per_row']:.2f}x | {worker} | {s['rows_per_s_8_clients']:.0f} | "
                f"{s['rows_per_s_8_clients'] / base['rows_per_s_2_threads']:.2f} |"
            )
    served = {name: r["fhe_bento"] for name, r in results.items()}
    lines += [
        "",
        "fhe-bento's server CPU per row, one client, measured by the OS (every thread's own CPU time):",
        "",
        "| model | engines (FHE, its pickling) | worker: event loop (HTTP, checks, answer) | "
        "worker: engine supervisors (hop to the engines) |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in served.items():
        lines.append(
            f"| {name} | {s['cpu_ms_per_row'] - s['worker_cpu_ms_per_row']:.2f} | "
            f"{s['worker_loop_cpu_ms_per_row']:.2f} | "
            f"{s['worker_cpu_ms_per_row'] - s['worker_loop_cpu_ms_per_row']:.2f} |"
        )
    back, paused = ping["back_to_back"], ping["paused"]
    floor = paused["worker_cpu_ms_per_row"]
    floors = ", ".join(
        f"{name} {(r['in_process']['cpu_ms_per_row'] + floor) / r['in_process']['cpu_ms_per_row']:.2f}x"
        for name, r in results.items()
    )
    lines += [
        "",
        f"The HTTP stack's floor: the worker's CPU for `GET /ping` is {back['worker_cpu_ms_per_row']:.2f} ms "
        f"back to back, and {floor:.2f} ms when the client waits {1000 * ROW_PAUSE:.0f} ms (one cheap row's "
        "FHE) between two requests: the same work costs more in a worker that wakes from idle, as it does "
        "for every row whose FHE runs in an engine process. A server that kept FHE out of its HTTP process "
        "(a crash in concrete must not take other requests with it) and did nothing but relay would so cost "
        f"at least: {floors} of the in-process CPU per row, with engines as cheap as the in-process loop.",
    ]
    stages = {name: r["stages"] for name, r in results.items() if "stages" in r}
    if stages:
        names = list(stages)
        lines += [
            "",
            "Where fhe-bento's server CPU goes: py-spy samples of every server process while one client sends",
            "rows. py-spy sees Python stacks only, so time in syscalls, thread wake-ups and the GIL is undercounted;",
            "the worker's CPU above is the measured total.",
            "",
            "| stage | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for stage in next(iter(stages.values())):
            lines.append(f"| {stage} | " + " | ".join(f"{stages[n][stage]:.0%}" for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
