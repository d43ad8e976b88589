"""A bounded load-and-fault run, shared by tests/test_reliability.py (which asserts on it) and
bench/reliability.py (which writes docs/reliability.md).

Clients send a fixed mix of valid and invalid requests to two replicas that share one key store, while
one replica is SIGKILLed (its whole process tree) and restarted mid-run. A request that loses its
connection to the killed replica is sent to the other one, as a load balancer would do.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil

from fhe_bento.client.api import RemoteModel
from fhe_bento.client.http_transport import OCTET
from fhe_bento.protocol import wire
from harness.devserver import Server


@dataclass
class Owner:
    """One data owner: its own keys for the keyed model, and the keyless model."""

    keyed: RemoteModel
    keyless: RemoteModel


@dataclass
class Outcome:
    answers: Counter = field(default_factory=Counter)  # "200", "400 invalid_key", "connection lost", ...
    accepted_keys: set[tuple[str, str]] = field(default_factory=set)  # (model, key id) answered 200/201
    predictions: list[tuple[RemoteModel, int, bytes]] = field(default_factory=list)  # (model, row, answer)
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.answers.values())


def tree_rss(server: Server) -> int:
    root = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


class Balancer:
    """Round-robin over the replicas in rotation; a request whose connection fails goes to the next one.
    A replica leaves the rotation when it is killed and comes back once its /ping answers 200, as a load
    balancer's health checks would do (only faster)."""

    def __init__(self, replicas: list[Server], outcome: Outcome) -> None:
        self.replicas = replicas
        self.outcome = outcome
        self.lock = threading.Lock()
        self.turn = 0
        self.down: set[int] = set()

    def send(self, method: str, path: str, **options) -> httpx.Response:
        with self.lock:
            self.turn += 1
            first = self.turn
        for attempt in range(len(self.replicas) * 3):
            index = (first + attempt) % len(self.replicas)
            if index in self.down:
                continue
            server = self.replicas[index]
            try:
                response = httpx.request(method, server.url + path, timeout=600, **options)
            except httpx.TransportError:
                self.record("connection lost")
                time.sleep(0.2)
                continue
            code = (
                response.json()["error"]["code"] if response.status_code >= 400 and method != "HEAD" else ""
            )
            self.record(f"{response.status_code} {code}".strip())
            return response
        raise RuntimeError(f"no replica answered {method} {path}")

    def record(self, answer: str) -> None:
        with self.lock:
            self.outcome.answers[answer] += 1


def client_round(lb: Balancer, owner: Owner, x: np.ndarray, index: int, outcome: Outcome) -> None:
    """One round of one client: valid uploads and predictions, then each kind of invalid request."""
    keyed, keyless = owner.keyed, owner.keyless
    key = keyed.evaluation_key()
    response = lb.send("POST", f"/v1/models/{keyed.name}/keys", content=key, headers=OCTET)
    key_id = response.json().get("key_id")
    if response.status_code in (200, 201):
        outcome.accepted_keys.add((keyed.name, key_id))
    row = index % len(x)
    targets = [(keyless, {})] + ([(keyed, {"X-FHE-Key-Id": key_id})] if index % 2 == 0 else [])
    for model, headers in targets:
        response = lb.send(
            "POST",
            f"/v1/models/{model.name}/predict",
            content=model.encrypt(x[row : row + 1])[0],
            headers={**OCTET, **headers},
        )
        if response.status_code == 200:
            outcome.predictions.append((model, row, response.content))
    good = keyless.encrypt(x[row : row + 2])
    response = lb.send(
        "POST",
        f"/v1/models/{keyless.name}/predict_batch",
        content=wire.encode_batch(good),
        headers={"Content-Type": wire.CONTENT_TYPE},
    )
    if response.status_code == 200:
        outcome.predictions += [
            (keyless, row + i, a) for i, a in enumerate(wire.decode_batch(response.content, 2))
        ]
    invalid: list[tuple[str, str, dict]] = [
        ("POST", f"/v1/models/{keyless.name}/predict", {"content": b"garbage" * 10, "headers": OCTET}),
        ("POST", f"/v1/models/{keyed.name}/keys", {"content": key[: len(key) // 3], "headers": OCTET}),
        (
            "POST",
            f"/v1/models/{keyless.name}/predict",
            {"content": good[0], "headers": {"Content-Type": "text/plain"}},
        ),
        (
            "POST",
            f"/v1/models/{keyed.name}/predict",
            {"content": keyed.encrypt(x[row : row + 1])[0], "headers": {**OCTET, "X-FHE-Key-Id": "0" * 64}},
        ),
        (
            "POST",
            f"/v1/models/{keyless.name}/predict_batch",
            {"content": wire.MAGIC + b"\x00\x00\x00\x05", "headers": {"Content-Type": wire.CONTENT_TYPE}},
        ),
        ("POST", "/v1/models/no-such-model/predict", {"content": good[0], "headers": OCTET}),
    ]
    for method, path, options in invalid:
        lb.send(method, path, **options)


def run(replicas: list[Server], victim: Server, owners: list[Owner], x: np.ndarray, rounds: int) -> Outcome:
    """Warm every replica up, measure the survivor's memory, run `rounds` rounds per owner while the
    victim is SIGKILLed and restarted once a third of the way, then measure the survivor again."""
    outcome = Outcome()
    survivor = next(s for s in replicas if s is not victim)
    for owner in owners:
        key_id = owner.keyed.ensure_key()
        ciphertext = owner.keyed.encrypt(x[:1])[0]
        for server in replicas:  # every worker of every replica has used every key once
            httpx.post(
                f"{server.url}/v1/models/{owner.keyed.name}/predict",
                content=ciphertext,
                timeout=600,
                headers={**OCTET, "X-FHE-Key-Id": key_id},
            ).raise_for_status()
    outcome.rss_before = tree_rss(survivor)
    lb = Balancer(replicas, outcome)
    total = len(owners) * rounds
    done = threading.Semaphore(0)

    def killer() -> None:
        for _ in range(max(1, total // 3)):
            done.acquire()
        lb.down.add(replicas.index(victim))
        victim.kill()
        victim.start()  # returns once /ping answers 200
        lb.down.discard(replicas.index(victim))

    def client(owner: Owner) -> None:
        for index in range(rounds):
            client_round(lb, owner, x, index, outcome)
            done.release()

    started = time.perf_counter()
    with ThreadPoolExecutor(len(owners) + 1) as pool:
        killed = pool.submit(killer)
        list(pool.map(client, owners))
        killed.result()  # a kill or restart that failed fails the run
    outcome.seconds = time.perf_counter() - started
    outcome.rss_after = tree_rss(survivor)
    return outcome


def markdown(outcome: Outcome, keys_lost: int, wrong_predictions: int, cores: int) -> str:
    rows = "\n".join(f"| {answer} | {count} |" for answer, count in sorted(outcome.answers.items()))
    return f"""# Reliability

Produced by `bench/reliability.py` (the scenario of `tests/test_reliability.py`, in
`harness/loadfault.py`) on one machine with {cores} cores. Two replicas of `bentoml serve` share one
`file://` key store. {len(outcome.accepted_keys)} clients, each with its own XGB evaluation key, send a
fixed mix of valid requests (key upload, XGB and logistic-regression predictions, batches) and invalid ones
(garbage ciphertext, truncated key, wrong content type, unknown key, broken batch framing, unknown model),
while one replica is SIGKILLed (every process of it) and restarted a third of the way through. A request
whose connection the kill cut is sent again to the other replica, as a load balancer would; the killed
replica is back in rotation once its `/ping` answers 200 again.

| figure | value |
| --- | --- |
| requests (each attempt counted) | {outcome.requests} |
| **5xx answers** | **{sum(n for answer, n in outcome.answers.items() if answer.startswith("5"))}** |
| run time | {outcome.seconds:.0f} s |
| keys accepted | {len(outcome.accepted_keys)} |
| **keys lost** (accepted, then not registered or not usable on every replica) | **{keys_lost}** |
| rows predicted with a 200 answer (decrypted and checked) | {len(outcome.predictions)} |
| **200 answers that did not decrypt to the clear prediction** | **{wrong_predictions}** |
| surviving replica RSS, all processes, before / after | {outcome.rss_before / 1e6:.0f} MB / {outcome.rss_after / 1e6:.0f} MB ({outcome.rss_after / outcome.rss_before:.2f}x) |

## Answers by kind

| answer | count |
| --- | --- |
{rows}

"connection lost" counts the requests in flight on the killed replica, or sent to it while it was down;
each one was then answered by the other replica.
"""
