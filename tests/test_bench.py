"""The cheap-circuit benchmark (bench/cheap.py) runs and produces every figure docs/benchmarks.md reports:
a brief run with a few rows, no profile and no report. It checks no time: these machines are shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"latency_ms", "cpu_ms_per_row"}


def test_the_cheap_circuit_benchmark_produces_its_figures():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cheap.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # only stops a hung run
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    for model in ("breast-cancer-logreg", "hybrid-linear"):
        for where in ("in_process", "fhe_bento", "reference"):
            got = {k.split(".")[-1]: v for k, v in figures.items() if k.startswith(f"{model}.{where}.")}
            assert set(got) >= FIGURES, (model, where, sorted(got))
            assert all(value > 0 for value in got.values()), (model, where, got)
        assert figures[f"{model}.fhe_bento.rows_per_s_8_clients"] > 0
        assert figures[f"{model}.in_process.rows_per_s_2_threads"] > 0
