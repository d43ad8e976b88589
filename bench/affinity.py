"""Key affinity: SageMaker stateful sessions against random routing, on two replicas of one s3:// store.

    .venv/bin/python bench/affinity.py [--requests 24] [--clients 1,4,12]

A run with some K values keeps the other levels of the last run (bench/results/affinity.json).

Two `bentoml serve` replicas (default settings: one engine each, the warm-key bound derived from the
machine's memory) share a key store on moto's server mode, behind `harness/sagemaker_balancer.py`, which routes as
SageMaker does; the clients are real boto3 `invoke_endpoint` callers. For K = 1, 4 and 12 distinct clients
(each with its own key) and each routing, fresh replicas get max(--requests, 4 K) one-row predictions, sent
one at a time, round robin over the clients (so that every client comes back at least three times). Reported: cold-key loads per 100 requests (the replicas' key
cache misses), resident memory per replica at the end (PSS of its processes), p50 latency of a
prediction at the client. The figures go to the "Key affinity" section of docs/benchmarks.md and to
bench/results/affinity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import MODEL, ROOT, report, start_server, throwaway_home, write_sections

CLIENTS = (1, 4, 12)
ROUTINGS = ("random", "sessions")


def run_level(home: Path, store: str, owners: list[Path], routing: str, requests: int, x, clear) -> dict:
    import boto3

    from fhe_bento.client import FHEClient
    from harness.sagemaker_balancer import Balancer

    replicas = [start_server(home / f"{routing}-{len(owners)}-{i}", store) for i in range(2)]
    idle = [r.resident_bytes() for r in replicas]
    try:
        with Balancer([r.url for r in replicas], seed=len(owners)) as balancer:
            runtime = boto3.client("sagemaker-runtime", endpoint_url=balancer.url)
            models = [
                FHEClient.sagemaker(
                    "bench",
                    runtime_client=runtime,
                    cache_dir=cache,
                    progress=False,
                    key_affinity=routing == "sessions",
                ).model(MODEL)
                for cache in owners
            ]
            for model in models:
                model.ensure_key()  # registered already: a has_key call
            latencies, wrong = [], 0
            for i in range(requests):
                model, row = models[i % len(models)], x[i % len(x) : i % len(x) + 1]
                started = time.perf_counter()
                answer = model.predict(row)
                latencies.append(time.perf_counter() - started)
                wrong += int(answer[0] != clear[i % len(x)])
            misses = sum(r.metric("fhe_bento_key_cache_total", model=MODEL, result="miss") for r in replicas)
            served = [balancer.counts("predict_batch")[r.url] for r in replicas]
            memory = [r.resident_bytes() for r in replicas]
    finally:
        for server in replicas:
            server.stop()
    return {
        "clients": len(owners),
        "routing": routing,
        "requests": requests,
        "wrong": wrong,
        "cold_per_100": 100 * misses / requests,
        "p50_s": statistics.median(latencies),
        "rss_gb_per_replica": [m / 1e9 for m in memory],
        "rss_growth_gb_per_replica": [(m - i) / 1e9 for m, i in zip(memory, idle, strict=False)],
        "requests_per_replica": served,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=24, help="predictions per level, at least 4 per client"
    )
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="comma-separated K values")
    args = parser.parse_args()
    ks = [int(k) for k in args.clients.split(",")]

    home = throwaway_home()
    import boto3

    from fhe_bento.client import FHEClient
    from fhe_bento.modelkit.demo import import_trained, train
    from harness.devserver import MotoServer

    models, data = train([MODEL])
    import_trained(models)
    x = data.x_test[:12]
    clear = models[MODEL].predict(x, fhe="disable")
    moto = MotoServer()
    os.environ.update(moto.env())
    boto3.client("s3").create_bucket(Bucket="bench-affinity")
    store = "s3://bench-affinity/keys"
    owners = [home / f"owner{i}" for i in range(max(ks))]
    levels = []
    try:
        setup = start_server(home / "setup", store)
        try:  # every client's key, registered once in the shared store
            for cache in owners:
                FHEClient(setup.url, cache_dir=cache, progress=False).model(MODEL).ensure_key()
        finally:
            setup.stop()
        for clients in ks:
            for routing in ROUTINGS:
                level = run_level(
                    home, store, owners[:clients], routing, max(args.requests, 4 * clients), x, clear
                )
                print(level, flush=True)
                levels.append(level)
    finally:
        moto.stop()
    results = ROOT / "bench" / "results" / "affinity.json"
    if results.exists():  # the levels this run did not measure, from the last run
        measured = {(lv["clients"], lv["routing"]) for lv in levels}
        levels += [
            lv
            for lv in json.loads(results.read_text())["levels"]
            if (lv["clients"], lv["routing"]) not in measured
        ]
    levels.sort(key=lambda lv: (lv["clients"], ROUTINGS.index(lv["routing"])))
    report("affinity", {"cores": os.cpu_count(), "levels": levels})
    write_markdown(levels)


def write_markdown(levels: list[dict]) -> None:
    rows = "\n".join(
        f"| {lv['clients']} | {lv['routing']} | {lv['requests']} | {lv['cold_per_100']:.0f} | "
        f"{' / '.join(f'{gb:.2f}' for gb in lv['rss_gb_per_replica'])} | "
        f"{' / '.join(f'{gb:.2f}' for gb in lv['rss_growth_gb_per_replica'])} | {lv['p50_s']:.2f} | "
        f"{' / '.join(map(str, lv['requests_per_replica']))} | {lv['wrong']} |"
        for lv in levels
    )
    write_sections(
        ROOT / "docs" / "benchmarks.md",
        {
            "Key affinity": f"""
Produced by `bench/affinity.py` in one run: two replicas (default settings: one engine each, the
warm-key bound derived from the machine's memory, docs/operations.md "Memory") on one `s3://` store (moto), behind
`harness/sagemaker_balancer.py`, which routes as SageMaker does. Each level starts fresh replicas and sends
the given number of one-row XGB predictions (at least 4 per client) through real boto3, one at a time, round robin over K
clients with a key each. "random" sends no session ids (SageMaker's default routing), "sessions" is the
client's default (docs/sagemaker.md, "Key affinity"). Cold loads are the replicas' key cache misses; memory is the
proportional set size of each replica's processes (shared pages counted once) at the end
of the level, and how much of it the level added to the idle replica.

How to read it: with sessions each key is loaded on one replica only, so the cold loads of a level are its
K first touches, plus evictions where the random placement of sessions gives one replica more keys than
its warm-key bound holds. With random routing every key is warmed on both replicas, and once K keys no
longer fit one replica's bound, most requests are cold.

| K clients | routing | requests | cold-key loads per 100 requests | resident GB per replica | of which grown during the level | p50 latency s | requests per replica | wrong answers |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
"""
        },
    )


if __name__ == "__main__":
    main()
