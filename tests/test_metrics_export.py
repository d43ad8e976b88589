"""Metrics in CloudWatch and audit lines, on a real `bentoml serve` (docs/operations.md, "Metrics"): with an
endpoint name and a one-second interval, the server's stdout carries EMF lines that parse as EMF, whose
values add up to what `/metrics` says, and one JSON audit line per key upload, key delete and prediction
batch; and nothing in the whole run's log is a ciphertext, a key or a token."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import signal
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from conftest import LOGREG, XGB, assert_error
from prometheus_client.parser import text_string_to_metric_families

from fhe_bento.client import FHEClient
from fhe_bento.protocol import wire
from fhe_bento.protocol.names import KEY_ID_HEADER, OCTET_STREAM
from fhe_bento.runtime.audit import AUDIT_LOGGER, FIELDS
from fhe_bento.runtime.cloudwatch import ENDPOINT_DIMENSION, NAMESPACE
from harness.devserver import Server

TOKEN = "metrics-export-predict-token-5e1f0c"
ADMIN = "metrics-export-admin-token-a9d3b7"
ENDPOINT = "test-endpoint"
ROWS = 3
SLICE = 30  # bytes of a secret looked for: a multiple of 3, so that its base64 is a substring of the whole's


def _json_lines(log: str) -> list[dict]:
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # a line of concrete's or BentoML's that starts so
                found.append(json.loads(line))
    return found


def _emf_lines(log: str) -> list[dict]:
    """Every EMF line of the log, each a whole line that parses (none cut or interleaved)."""
    found = [line for line in _json_lines(log) if "_aws" in line]
    assert len(found) == sum('"_aws"' in line for line in log.splitlines())
    return found


def _check_emf(line: dict) -> list[str]:
    """The line against the EMF specification's required members; returns its metric names."""
    assert isinstance(line["_aws"]["Timestamp"], int)
    [directive] = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == NAMESPACE
    assert [ENDPOINT_DIMENSION] in directive["Dimensions"]
    for dimensions in directive["Dimensions"]:
        assert dimensions[0] == ENDPOINT_DIMENSION
        assert all(isinstance(line[name], str) and line[name] for name in dimensions)
    assert line[ENDPOINT_DIMENSION] == ENDPOINT
    names = [metric["Name"] for metric in directive["Metrics"]]
    assert names and all(isinstance(line[name], int | float) for name in names)
    return names


def _metrics(server: Server) -> dict[str, list[tuple[dict, float]]]:
    """/metrics' fhe-bento samples: name -> [(labels, value)]."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("fhe_bento_"):
                samples[sample.name].append((sample.labels, sample.value))
    return samples


def _emf_sums(lines: list[dict], metric: str, *by: str) -> dict[tuple, float]:
    sums: dict[tuple, float] = defaultdict(float)
    for line in lines:
        if metric in line:
            sums[tuple(line[label] for label in by)] += line[metric]
    return {group: value for group, value in sums.items() if value}


def _prom_sums(samples, name: str, *by: str, **where: set[str]) -> dict[tuple, float]:
    sums: dict[tuple, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        if all(labels.get(label) in values for label, values in where.items()):
            sums[tuple(labels[label] for label in by)] += value
    return {group: value for group, value in sums.items() if value}


def _distinctive(data: bytes) -> bytes:
    """SLICE bytes from the middle of `data`, as varied as a ciphertext or a key is there."""
    start = len(data) // 2
    while len(set(data[start : start + SLICE])) < SLICE // 2:
        start += SLICE
    return data[start : start + SLICE + 2]  # two more: the three alignments of base64 below


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could be written to a log: raw, hex (either case), base64 (standard and URL-safe,
    whatever the alignment of the whole it was part of)."""
    forms = [secret[:SLICE], binascii.hexlify(secret[:SLICE]), binascii.hexlify(secret[:SLICE]).upper()]
    for shift in range(3):
        chunk = secret[shift : shift + SLICE - 3]
        forms += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return forms


def _assert_no_secret(log_path: Path, secrets: dict[str, bytes]) -> None:
    log = log_path.read_bytes()
    assert len(log) > 10_000  # a whole run's log, not an empty file
    assert TOKEN.encode() not in log and ADMIN.encode() not in log
    for what, secret in secrets.items():
        for form in _forms(secret):
            assert form not in log, f"the log holds {what}"


def _traffic(server: Server, demo, workdir: Path) -> dict:
    """Key upload, predictions of both models, bad requests and a key delete; returns what it sent."""
    client = FHEClient(server.url, cache_dir=workdir / "client", progress=False, token=TOKEN)
    xgb, logreg = client.model(XGB), client.model(LOGREG)
    key_id = xgb.ensure_key()
    assert key_id is not None
    x = demo.x_test[:ROWS]
    assert list(xgb.predict(x)) == list(demo.clear_predict(XGB, x))
    assert list(logreg.predict(x)) == list(demo.clear_predict(LOGREG, x))
    [ciphertext] = xgb.encrypt(x[:1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    octet = {**auth, "Content-Type": OCTET_STREAM}
    url = f"{server.url}/v1/models/{XGB}"
    answer = httpx.post(
        f"{url}/predict", content=ciphertext, headers={**octet, KEY_ID_HEADER: key_id}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    assert_error(
        httpx.post(f"{url}/predict", content=ciphertext, headers={**octet, KEY_ID_HEADER: "not-a-key-id"}),
        400,
        "invalid_key_id",
    )
    assert_error(
        httpx.post(
            f"{url}/predict_batch",
            content=wire.encode_batch([ciphertext]),
            headers={**auth, "Content-Type": wire.CONTENT_TYPE, KEY_ID_HEADER: "cd" * 32},
        ),
        404,
        "unknown_key",
    )
    refused = httpx.post(f"{url}/predict", content=ciphertext, headers={"Authorization": f"Bearer {ADMIN}x"})
    assert_error(refused, 401, "invalid_token")
    assert httpx.delete(f"{url}/keys/{key_id}", headers=auth).status_code == 204
    versions = {m["name"]: m["version"] for m in httpx.get(f"{server.url}/v1/models", headers=auth).json()}
    return {"key_id": key_id, "ciphertext": ciphertext, "key": xgb.evaluation_key(), "versions": versions}


def test_emf_lines_add_up_to_metrics_audit_lines_are_json_and_no_secret_is_logged(demo, tmp_path):
    env = {
        "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
        "FHE_BENTO_WORKERS": "1",
        "FHE_BENTO_KEY_STORE": (tmp_path / "keys").as_uri(),
        "FHE_BENTO_STAGING_DIR": str(tmp_path / "staging"),
        "FHE_BENTO_EMF_SECONDS": "1",
        "FHE_BENTO_ENDPOINT_NAME": ENDPOINT,
        "FHE_BENTO_PREDICT_TOKENS": TOKEN,
        "FHE_BENTO_ADMIN_TOKENS": ADMIN,
    }
    server = Server(tmp_path / "server", env)
    server.start()
    try:
        sent = _traffic(server, demo, tmp_path)
        over = time.time() * 1000
        samples = _metrics(server)
        # A line taken after the traffic stopped: the EMF lines have counted all of it.
        deadline = time.monotonic() + 60
        while not any(line["_aws"]["Timestamp"] > over for line in _emf_lines(server.log())):
            assert time.monotonic() < deadline, "no EMF line after the traffic"
            time.sleep(0.2)
        lines = _emf_lines(server.log())
        for line in lines:
            _check_emf(line)

        rows = _prom_sums(samples, "fhe_bento_rows_total", "model", "version", outcome={"ok", "error"})
        assert rows == {
            (XGB, sent["versions"][XGB]): ROWS + 1,
            (LOGREG, sent["versions"][LOGREG]): ROWS,
        }
        assert _emf_sums(lines, "fhe_bento_rows", "model", "version") == rows
        for histogram in ("fhe_bento_fhe_run_seconds", "fhe_bento_serving_overhead_seconds"):
            for part in ("_sum", "_count"):
                expected = _prom_sums(samples, histogram + part, "model", "version")
                found = _emf_sums(lines, histogram + part, "model", "version")
                assert found.keys() == expected.keys() == rows.keys()
                assert all(found[g] == pytest.approx(expected[g], rel=1e-9) for g in expected)
        misses = _prom_sums(samples, "fhe_bento_key_cache_total", "model", "version", result={"miss"})
        assert misses == {(XGB, sent["versions"][XGB]): 1}
        assert _emf_sums(lines, "fhe_bento_key_cache_misses", "model", "version") == misses
        errors = _prom_sums(samples, "fhe_bento_errors_total", "code")
        assert {("invalid_key_id",), ("unknown_key",), ("invalid_token",)} <= errors.keys()
        assert _emf_sums(lines, "fhe_bento_errors", "code") == errors
        # Gauges: their value at the line's time; nothing moved since the traffic.
        last = [line for line in lines if "fhe_bento_key_cache_bytes" in line][-1]
        gauges = {
            "fhe_bento_key_cache_bytes": _prom_sums(samples, "fhe_bento_key_cache_bytes").get((), 0.0),
            "fhe_bento_key_verifications_queued": _prom_sums(
                samples, "fhe_bento_key_verifications", state={"queued"}
            ).get((), 0.0),
            "fhe_bento_key_verifications_running": _prom_sums(
                samples, "fhe_bento_key_verifications", state={"running"}
            ).get((), 0.0),
        }
        assert {name: last[name] for name in gauges} == gauges

        # The worker stops: after its drain, its last lines count the drain.
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(60) is not None
        server.proc = None
        lines = _emf_lines(server.log())
        for line in lines:
            _check_emf(line)
        assert sum(line.get("fhe_bento_drains", 0) for line in lines) == 1
        assert _emf_sums(lines, "fhe_bento_rows", "model", "version") == rows

        tenant = hashlib.sha256(TOKEN.encode()).hexdigest()[:32]
        audits = [line for line in _json_lines(server.log()) if line.get("logger") == AUDIT_LOGGER]
        for line in audits:
            assert list(line) == ["time", "level", "logger", *FIELDS]
        seen = [
            (a["event"], a["model"], a["key_id"], a["rows"], a["status"], a["code"])
            for a in audits
            if a["tenant"] == tenant
        ]
        key_id, xgb_version = sent["key_id"], sent["versions"][XGB]
        assert seen == [
            ("key_upload", XGB, key_id, None, 201, None),
            ("predict_batch", XGB, key_id, ROWS, 200, None),
            ("predict_batch", LOGREG, None, ROWS, 200, None),
            ("predict_batch", XGB, key_id, 1, 200, None),
            ("predict_batch", XGB, None, 1, 400, "invalid_key_id"),
            ("predict_batch", XGB, "cd" * 32, 1, 404, "unknown_key"),
            ("key_delete", XGB, key_id, None, 204, None),
        ]
        assert len(audits) == len(seen)
        assert all(a["version"] == sent["versions"][a["model"]] for a in audits)
        assert all(a["duration_ms"] >= 0 for a in audits) and xgb_version

        _assert_no_secret(
            server.log_path,
            {
                "the predict token": TOKEN.encode(),
                "the admin token": ADMIN.encode(),
                "a ciphertext": _distinctive(sent["ciphertext"]),
                "the evaluation key": _distinctive(sent["key"]),
            },
        )
    finally:
        server.stop()
