"""Shared fixtures: the demo models (trained once per run) and a real `bentoml serve` subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# BentoML reads its home when first used: point it at a throwaway store before anything imports it.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="fhe-bento-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

XGB = "breast-cancer-xgb"
LOGREG = "breast-cancer-logreg"


@dataclass
class Demo:
    models: dict  # name -> fitted, compiled concrete-ml estimator (the clear reference)
    x_test: np.ndarray
    dev_dirs: dict  # name -> FHEModelDev folder

    def clear_predict(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.models[name].predict(x, fhe="disable")


@pytest.fixture(scope="session")
def demo() -> Demo:
    from modelkit.demo import save_dev_folder, train
    from modelkit.importer import import_model

    models, data = train()
    dev_dirs = {}
    for name, model in models.items():
        dev_dirs[name] = save_dev_folder(model, _SESSION_DIR / "dev" / name)
        import_model(dev_dirs[name], name, classes=[int(c) for c in model.classes_])
    return Demo(models=models, x_test=data.x_test, dev_dirs=dev_dirs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `bentoml serve` process of the fhe-bento service, restartable on the same port and key store."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {**os.environ, **env}
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service.app:FHEBento", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over all series whose labels include `labels`."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
            if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
                total += float(match.group(2))
        return total


@pytest.fixture(scope="session")
def server_workdir() -> Path:
    path = _SESSION_DIR / "server"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def server(demo: Demo, server_workdir: Path):
    srv = Server(
        server_workdir,
        {
            "FHE_BENTO_MODELS": f"{XGB}:latest,{LOGREG}:latest",
            "FHE_BENTO_KEY_STORE": (server_workdir / "keys").as_uri(),
            "FHE_BENTO_STAGING_DIR": str(server_workdir / "staging"),
            "FHE_BENTO_WORKERS": "2",
            "FHE_BENTO_MAX_KEY_BYTES": str(64 * 1024 * 1024),
        },
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client_cache() -> Path:
    return _SESSION_DIR / "client-cache"
