"""Slow set-up commands (building the image, installing the client into a fresh venv) started as soon as
the tests that need them are collected, so that they run while the other tests do. A test's fixture waits
for its command's result."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from harness.devserver import ROOT


class BackgroundCommand:
    def __init__(self, name: str, argv: list[str], log_dir: Path):
        self.argv = argv
        self.stdout = log_dir / f"{name}.out"
        self.stderr = log_dir / f"{name}.err"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self.stdout.parent.mkdir(parents=True, exist_ok=True)
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self._process = subprocess.Popen(
                self.argv, cwd=ROOT, stdout=out, stderr=err, start_new_session=True
            )

    def result(self, timeout: float) -> str:
        """The command's last line of output, once it has succeeded (started now if it was not yet)."""
        if self._process is None:
            self.start()
        returncode = self._process.wait(timeout=timeout)
        assert returncode == 0, self.stderr.read_text(errors="replace")[-4000:]
        return self.stdout.read_text().strip().splitlines()[-1]

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
