"""The cheap-circuit and hybrid benchmarks (bench/cheap.py, bench/hybrid.py) run and produce every figure
docs/benchmarks.md reports: brief runs with a few rows, no profile and no report. They check no time:
these machines are shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"latency_ms", "cpu_ms_per_row"}


def smoke_figures(script: str) -> dict[str, float]:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,  # only stops a hung run
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_cheap_circuit_benchmark_produces_its_figures():
    figures = smoke_figures("cheap.py")
    for model in ("breast-cancer-logreg", "hybrid-linear"):
        for where in ("in_process", "fhe_bento", "reference"):
            got = {k.split(".")[-1]: v for k, v in figures.items() if k.startswith(f"{model}.{where}.")}
            assert set(got) >= FIGURES, (model, where, sorted(got))
            assert all(got[name] > 0 for name in FIGURES), (model, where, got)
        assert figures[f"{model}.fhe_bento.rows_per_s_8_clients"] > 0
        assert figures[f"{model}.in_process.rows_per_s_2_threads"] > 0
        # The OS's CPU accounting counts in 10 ms ticks: a brief run's split may hold zeros, never less.
        split = [f"{model}.fhe_bento.worker_cpu_ms_per_row", f"{model}.fhe_bento.worker_loop_cpu_ms_per_row"]
        assert all(figures[name] >= 0 for name in split), figures
    for pace in ("back_to_back", "paused"):
        assert figures[f"ping.{pace}.worker_cpu_ms_per_row"] >= 0, figures


def test_the_hybrid_benchmark_produces_its_figures():
    figures = smoke_figures("hybrid.py")
    expected = {
        "module_call.in_process.latency_ms",
        "module_call.in_process.cpu_ms_per_row",
        "module_call.fhe_bento.latency_ms",
        "module_call.fhe_bento.cpu_ms_per_row",
        "module_call.fhe_bento.rows_per_s_8_clients",
        "forward_s.fhe_bento.pass",
        "forward_s.fhe_bento.compute_call",
        "forward_s.reference.pass",
        "forward_s.reference.compute_call",
        "tokens_per_s.fhe_bento",
    }
    assert set(figures) >= expected, sorted(expected - set(figures))
    assert all(figures[name] > 0 for name in expected), figures
