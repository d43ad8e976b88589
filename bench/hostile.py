"""Crafted ciphertexts and keys, by attack family, against a server run as the image runs it
(BENTOML_CONTAINERIZED=true), then the recovery after a SIGKILL of its engine and of its worker.
Called by bench/reliability.py, which adds the section to docs/reliability.md."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

XGB, LOGREG = "breast-cancer-xgb", "breast-cancer-logreg"
OCTET = {"Content-Type": "application/octet-stream"}
SEED = 10
CIPHERTEXT_CASES, KEY_CASES = 40, 6  # per family and model / per family


def _wait(condition, limit: float = 600.0) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise RuntimeError("the server did not recover")
        time.sleep(0.05)
    return time.monotonic() - started


def _ping(server) -> int:
    try:
        return httpx.get(f"{server.url}/ping", timeout=5).status_code
    except httpx.TransportError:
        return 0


def run(home: Path, x, clear_predict) -> str:
    """The section's markdown; `clear_predict(model, rows)` gives the clear quantized labels."""
    from fhe_bento.client import FHEClient
    from harness.capnp_attacks import FAMILIES, mutate
    from harness.devserver import Server
    from harness.loadfault import tree_rss

    env = {
        "BENTOML_CONTAINERIZED": "true",
        "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
        "FHE_BENTO_KEY_STORE": (home / "hostile-keys").as_uri(),
    }
    server = Server(home / "hostile", env)
    server.start()
    client = FHEClient(server.url, cache_dir=home / "hostile-owner", progress=False)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    key, key_id = xgb.evaluation_key(), xgb.ensure_key()
    real = {XGB: xgb.encrypt(x[:1])[0], LOGREG: logreg.encrypt(x[:1])[0]}
    xgb.predict(x[:1]), logreg.predict(x[:1])  # every code path warm before memory is measured
    rng = random.Random(SEED)
    answers: dict[str, Counter] = defaultdict(Counter)
    rss_before, requests = tree_rss(server), 0
    for family in FAMILIES:
        for model in (LOGREG, XGB):
            if family == "blob content" and model == XGB:
                continue  # valid shape, seconds of FHE for a wrong answer: the logreg cases show it
            for _ in range(CIPHERTEXT_CASES):
                body = mutate(real[model], family, rng.randint)
                response = httpx.post(
                    f"{server.url}/v1/models/{model}/predict",
                    content=body,
                    timeout=600,
                    headers={**OCTET, "X-FHE-Key-Id": key_id},
                )
                answers[f"ciphertext: {family}"][_code(response)] += 1
                requests += 1
        if family != "blob content":
            for _ in range(KEY_CASES):
                response = httpx.post(
                    f"{server.url}/v1/models/{XGB}/keys",
                    content=mutate(key, family, rng.randint),
                    headers=OCTET,
                    timeout=600,
                )
                answers[f"key: {family}"][_code(response)] += 1
                requests += 1
    rss_after = tree_rss(server)
    restarts = server.metric("fhe_bento_engine_restarts_total")
    correct = all((m.predict(x[:4]) == clear_predict(m.name, x[:4])).all() for m in (xgb, logreg))

    (engine,) = server.engines()
    engine.send_signal(signal.SIGKILL)
    _wait(lambda: _ping(server) != 200)
    killed = time.monotonic()
    _wait(lambda: _ping(server) == 200)
    engine_recovery = time.monotonic() - killed
    logreg.predict(x[:1])
    proc = server.proc
    server.worker().send_signal(signal.SIGKILL)
    worker_exit = _wait(lambda: proc.poll() is not None)
    status = proc.returncode
    server.proc = None

    rows = "\n".join(
        f"| {family} | {sum(c.values())} | {', '.join(f'{k}: {n}' for k, n in sorted(c.items()))} |"
        for family, c in answers.items()
    )
    return f"""
## Crafted ciphertexts and keys (`bench/hostile.py`)

A server run as the image runs it (`BENTOML_CONTAINERIZED=true`: BentoML respawns no worker) got
{requests} crafted requests, made from real ciphertexts and an XGB evaluation key by the attack families of
`harness/capnp_attacks.py` (seed {SEED}), one request at a time. "blob content" keeps the message's
shape and only changes payload bytes: it is the one family that may pass, and it computes a wrong
answer, not a crash.

| family | requests | answers |
| --- | --- | --- |
{rows}

| figure | value |
| --- | --- |
| **engine deaths** during the crafted requests | **{restarts:.0f}** |
| server RSS, all processes, before / after | {rss_before / 1e6:.0f} MB / {rss_after / 1e6:.0f} MB |
| memory growth per crafted request | {(rss_after - rss_before) / requests / 1e3:.1f} KB |
| still serving correctly afterwards | {"yes" if correct else "no"} |
| SIGKILL of the engine: `/ping` 200 again after | {engine_recovery:.1f} s (rows in flight got 503 `runner_unavailable`) |
| SIGKILL of the worker: the server exited after | {worker_exit:.1f} s, status {status} |
"""


def _code(response: httpx.Response) -> str:
    if response.status_code < 400:
        return str(response.status_code)
    return f"{response.status_code} {response.json()['error']['code']}"
