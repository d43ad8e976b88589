"""Load that must not take an instance out of service: a burst keeps `/ping` honest, and concurrent key
uploads stay within the documented memory bound. (The hop to a runner served alone is checked under load in
tests/test_standalone_runner.py.)"""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from conftest import LOGREG, XGB, imported_spec

from fhe_bento.client import FHEClient
from harness.burst import burst
from harness.devserver import Server

OCTET = {"Content-Type": "application/octet-stream"}


def test_ping_stays_200_within_a_second_through_a_burst(server, demo, tmp_path):
    """50 connections for 20 s, half HEADs of unknown keys and half logreg predictions, on a server with
    two workers: every /ping is 200 within 1 s, and the server is still up after."""
    ciphertext = (
        FHEClient(server.url, cache_dir=tmp_path, progress=False).model(LOGREG).encrypt(demo.x_test[:1])[0]
    )
    log_start = len(server.log())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        load = pool.apply_async(burst, (server.url, 20.0, 50, XGB, LOGREG, ciphertext))
        probes = []
        with httpx.Client(timeout=5) as probe:
            while not load.ready():
                started = time.monotonic()
                status = probe.get(f"{server.url}/ping").status_code
                probes.append((status, time.monotonic() - started))
                time.sleep(0.5)
        statuses = load.get()
    assert statuses[404] > 100 and statuses[200] > 100, statuses  # the runner answered throughout
    assert len(probes) >= 20, probes
    assert all(status == 200 and seconds < 1.0 for status, seconds in probes), probes
    assert server.proc.poll() is None and "stopping the server" not in server.log()[log_start:]
    print(f"burst answers {dict(statuses)}; slowest /ping {max(s for _, s in probes) * 1000:.0f} ms")


def test_concurrent_key_uploads_stay_within_the_documented_memory_bound(demo, tmp_path):
    """Six distinct keys uploaded at once to a server allowed one verification and one waiting upload:
    the others are refused with 503 overloaded and retried by the client, every upload ends registered,
    and the server's resident growth stays within the bound of docs/operations.md "Memory" (verifications x their cost
    + the uploads held in memory), not six verifications' worth."""
    from fhe_bento.runners.memory_plan import plan_memory
    from fhe_bento.runtime.settings import Settings

    env = {
        "FHE_BENTO_MAX_VERIFICATIONS": "1",
        "FHE_BENTO_MAX_QUEUED_VERIFICATIONS": "1",
        "FHE_BENTO_MAX_OPEN_UPLOADS_PER_SCOPE": "8",
        "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
    }
    spec = imported_spec(XGB)
    plan = plan_memory(Settings(max_verifications=1, max_queued_verifications=1), {XGB: spec})
    server = Server(tmp_path / "server", env)
    server.start()
    try:
        models = [
            FHEClient(server.url, cache_dir=tmp_path / f"owner{i}", progress=False).model(XGB)
            for i in range(6)
        ]
        for model in models:
            model.evaluation_key()  # keys made before the uploads, so they start together
        before = server.resident_bytes()
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak.append(server.resident_bytes())

        sampler = threading.Thread(target=sample)
        sampler.start()
        with ThreadPoolExecutor(len(models)) as pool:
            key_ids = list(pool.map(lambda model: model.ensure_key(), models))
        sampling.set()
        sampler.join()
        growth = max(peak) - before
        held = (
            len(models) * 2 * spec.meta.eval_key_bytes
        )  # every upload's body, in the service and the runner
        bound = plan.verifications * plan.verify_cost + held
        margin = 100 * 10**6
        print(
            f"growth {growth / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB (+{margin / 1e6:.0f}); one verification "
            f"{plan.verify_cost / 1e6:.0f} MB"
        )
        assert growth <= bound + margin
        assert len(set(key_ids)) == len(models)
        for key_id in key_ids:
            assert httpx.head(f"{server.url}/v1/models/{XGB}/keys/{key_id}").status_code == 200
        assert server.metric("fhe_bento_key_verifications_refused_total") > 0  # the queue bound was reached
    finally:
        server.stop()
