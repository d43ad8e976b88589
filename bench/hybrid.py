"""Hybrid models: the demo `tiny-gpt2` (its first attention projection in FHE) served by fhe-bento, against
the same circuits in process and against a server built like Zama's reference hybrid server.

    .venv/bin/python bench/hybrid.py [--rows 200] [--passes 10] [--smoke]

Measured in one run, on the demo's circuit for 4-token contexts:
- one module call (one row), served against in process, as `bench/cheap.py` measures a cheap circuit
  (the same ciphertext again and again; server CPU per row over every server process);
- a forward pass of 3 sequences, driven by concrete-ml's own client (`HybridFHEModel` in remote mode,
  one `/compute` per row), through fhe-bento and through the reference server
  (`harness/zama_hybrid_server.py`, concrete-ml's `HybridFHEModelServer` behind FastAPI);
- generation with fhe-bento's client (`FHEClient.hybrid`): tokens per second, from a 2-token prompt.
Writes bench/results/hybrid.json and the "Hybrid models" section of docs/benchmarks.md (`--smoke`: a
few rows and passes, figures printed, no report).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cheap
from common import ROOT, report, throwaway_home, write_sections

SHAPE = "(1, 4, 16)"
SEQUENCES = 3
PROMPT = [5, 9]


def build(home: Path) -> tuple[Path, Path]:
    """The demo compiled into `home/hybrid/<name>` (where the reference server reads it) and imported:
    (that folder, the imported circuit's folder)."""
    import bentoml

    from fhe_bento.modelkit import tinygpt
    from fhe_bento.modelkit.importer import import_model

    saved = tinygpt.compile_hybrid(home / "hybrid" / tinygpt.NAME)
    import_model(saved, tinygpt.NAME)
    stored = Path(bentoml.models.get(f"{tinygpt.NAME}:latest").path)
    layout = json.loads((stored / "fhe-bento-hybrid.json").read_text())["modules"]
    return saved, stored / layout[tinygpt.REMOTE_MODULES[0]][SHAPE]


def forward_seconds(url: str, work: Path, passes: int) -> dict[str, float]:
    """Median seconds of a forward pass of SEQUENCES 4-token sequences, concrete-ml's client against `url`,
    and of one of its `/compute` round trips (the server's share; the rest is the client's own work)."""
    import requests
    import torch
    from concrete.ml.torch import hybrid_model

    from fhe_bento.modelkit import tinygpt

    work.mkdir(parents=True)
    hybrid = hybrid_model.HybridFHEModel(
        tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES, server_remote_address=url, model_name=tinygpt.NAME
    )
    hybrid.init_client(path_to_clients=work / "clients", path_to_keys=work / "keys")
    hybrid.set_fhe_mode("remote")
    ids = tinygpt.calibration_ids(4, rows=SEQUENCES, seed=1)
    calls: list[float] = []

    def timed_post(*args: Any, **kwargs: Any) -> requests.Response:  # the client's only POST here: /compute
        started = time.perf_counter()
        response = requests.post(*args, **kwargs)
        calls.append(time.perf_counter() - started)
        return response

    times = []
    with torch.no_grad():
        hybrid.model(ids)  # warm-up: connections, key cache
        hybrid_model.requests = SimpleNamespace(get=requests.get, post=timed_post)  # type: ignore[attr-defined]
        try:
            for _ in range(passes):
                started = time.perf_counter()
                hybrid.model(ids)
                times.append(time.perf_counter() - started)
        finally:
            hybrid_model.requests = requests  # type: ignore[attr-defined]
    return {"pass": statistics.median(times), "compute_call": statistics.median(calls)}


def tokens_per_second(url: str, cache: Path, tokens: int) -> float:
    from fhe_bento.client.api import FHEClient
    from fhe_bento.modelkit import tinygpt

    model = FHEClient(url, cache_dir=cache, progress=False).hybrid(
        tinygpt.NAME, tinygpt.TinyGPT.build(), tinygpt.REMOTE_MODULES
    )
    tinygpt.generate(model, PROMPT, tokens)  # warm-up: client.zip, keys
    started = time.perf_counter()
    tinygpt.generate(model, PROMPT, tokens)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="a few rows and passes, figures printed, no report"
    )
    args = parser.parse_args()
    rows, passes = (12, 2) if args.smoke else (args.rows, args.passes)
    home = throwaway_home()
    from fhe_bento.modelkit import tinygpt
    from harness.devserver import Server

    saved, circuit = build(home)
    row = cheap.client_row(circuit, home / "client-keys")
    local = cheap.InProcess(circuit, row)
    name = f"{tinygpt.NAME}/{tinygpt.REMOTE_MODULES[0]}/1x4x16"
    # Module calls as bench/cheap.py measures a cheap circuit: two engine processes of one OpenMP thread,
    # against one thread in process.
    server = Server(home / "server", {"FHE_BENTO_MODELS": f"{tinygpt.NAME}:latest", **cheap.ENGINE_ENV})
    server.start()
    try:
        endpoint = cheap.Endpoint(
            server.port,
            f"/v1/models/{name}/predict",
            row.ciphertext,
            {"Content-Type": "application/octet-stream"},
            server.proc.pid,
            server.worker().pid,
        )
        results: dict[str, Any] = {"module_call": cheap.paired(local, endpoint, rows)}
    finally:
        server.stop()
    # Forward passes and generation with the default settings, as the reference runs with concrete's.
    server = Server(home / "server-defaults", {"FHE_BENTO_MODELS": f"{tinygpt.NAME}:latest"})
    server.start()
    try:
        results["forward_s"] = {"fhe_bento": forward_seconds(server.url, home / "client-a", passes)}
        results["tokens_per_s"] = tokens_per_second(server.url, home / "client-cache", 2)
    finally:
        server.stop()
    from harness.zama_hybrid_server import started

    with started(saved.parent) as url:
        results["forward_s"]["reference"] = forward_seconds(url, home / "client-b", passes)

    flat = {
        "module_call.in_process.latency_ms": results["module_call"]["in_process"]["latency_ms"],
        "module_call.in_process.cpu_ms_per_row": results["module_call"]["in_process"]["cpu_ms_per_row"],
        **{f"module_call.fhe_bento.{k}": v for k, v in results["module_call"]["fhe_bento"].items()},
        **{f"forward_s.{where}.{k}": v for where, d in results["forward_s"].items() for k, v in d.items()},
        "tokens_per_s.fhe_bento": results["tokens_per_s"],
    }
    if args.smoke:
        print(json.dumps(flat))  # the last line: what tests/test_bench.py reads
        return
    report("hybrid", flat)
    write_sections(ROOT / "docs" / "benchmarks.md", {"Hybrid models": markdown(results, os.cpu_count() or 1)})


def markdown(results: dict[str, Any], cores: int) -> str:
    base, served = results["module_call"]["in_process"], results["module_call"]["fhe_bento"]
    forward = results["forward_s"]
    ours, reference = forward["fhe_bento"], forward["reference"]["pass"]
    client_ms = 1000 * (ours["pass"] / SEQUENCES - ours["compute_call"])
    return "\n".join(
        [
            f"Produced by `bench/hybrid.py` in one run on {cores} cores: the demo `tiny-gpt2` (GPT-2's",
            "architecture, a small config, random weights), its first attention projection `h.0.attn.c_attn` in",
            f"FHE, on its circuit for 4-token contexts (input shape {SHAPE}). A module call is one row. The",
            f"forward pass is of {SEQUENCES} sequences (one module call each), driven by concrete-ml's own client",
            "(`HybridFHEModel` in remote mode, unmodified) against fhe-bento and against a server built like Zama's",
            "reference hybrid server (`harness/zama_hybrid_server.py`: concrete-ml's `HybridFHEModelServer` behind",
            "FastAPI). Module calls: fhe-bento with two engine processes of one OpenMP thread against one thread in",
            'process, in alternating blocks as in "Cheap circuits" (medians of their rounds); forward passes',
            "and generation: fhe-bento's default settings (one engine process, an OpenMP thread per core), the",
            "reference with concrete's default threads.",
            "Generation: fhe-bento's client (`FHEClient.hybrid`), 2 tokens after a 2-token prompt.",
            "Goals (issue 20): forward pass <= 0.5x the reference's; a module call <= in process + 2 ms.",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| module call in process, one row | {base['latency_ms']:.2f} ms ({base['cpu_ms_per_row']:.2f} ms CPU) |",
            f"| module call served by fhe-bento, one row | {served['latency_ms']:.2f} ms "
            f"(+{served['latency_ms'] - base['latency_ms']:.2f} ms) |",
            f"| server CPU per module call / in process | {served['cpu_ms_per_row'] / base['cpu_ms_per_row']:.2f}x |",
            f"| module calls per second, 8 clients / in process on 2 threads | "
            f"{served['rows_per_s_8_clients']:.0f} / {base['rows_per_s_2_threads']:.0f} |",
            f"| forward pass, fhe-bento / reference | {forward['fhe_bento']['pass'] * 1000:.1f} ms / "
            f"{forward['reference']['pass'] * 1000:.1f} ms "
            f"({forward['fhe_bento']['pass'] / forward['reference']['pass']:.2f}x) |",
            f"| of it, one `/compute` round trip, fhe-bento / reference | "
            f"{forward['fhe_bento']['compute_call'] * 1000:.1f} ms / {forward['reference']['compute_call'] * 1000:.1f} ms |",
            f"| of it, concrete-ml's client's own work per call (encrypt, decrypt; pass / {SEQUENCES} - round trip) | "
            f"{client_ms:.1f} ms |",
            f"| forward pass of a server answering in 0 ms / reference | {SEQUENCES * client_ms / 1000 / reference:.2f}x |",
            f"| tokens per second, fhe-bento's client | {results['tokens_per_s']:.1f} |",
        ]
    )


if __name__ == "__main__":
    main()
