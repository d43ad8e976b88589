"""The test harness's own clean-up."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPE = "a" * 64


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    import subprocess
    import sys

    from harness.session_dir import PREFIX, remove_abandoned

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    abandoned, running, other = (
        tmp_path / f"{PREFIX}{gone.stdout.strip()}",
        tmp_path / f"{PREFIX}{os.getpid()}",
        tmp_path / f"{PREFIX}notapid",
    )
    for path in (abandoned, running, other):
        (path / "client-venv").mkdir(parents=True)
    assert remove_abandoned(tmp_path) == [abandoned]
    assert not abandoned.exists() and running.exists() and other.exists()
