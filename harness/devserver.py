"""Run a real `bentoml serve` of the fhe-bento service as a subprocess: used by the tests and bench/."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fhe_bento.runtime.settings import RUNNER_KEEPALIVE_SECONDS

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `bentoml serve` process of the fhe-bento service, restartable on the same port and key store."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        target: str = "fhe_bento.service.app:FHEBento",
        ready_path: str = "/ping",
        serve_args: tuple[str, ...] = (),
    ) -> None:
        """`target`: what `bentoml serve` serves (the whole service, or the runner alone, which has no /ping
        and is ready at BentoML's own /readyz)."""
        self.target = target
        self.ready_path = ready_path
        self.serve_args = serve_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        # Each server gets its own BENTOML_HOME (sharing the model store): `bentoml serve` wipes
        # $BENTOML_HOME/prometheus_multiproc_dir at start, so two servers on one home lose each other's metrics.
        home = workdir / "bentoml-home"
        home.mkdir(parents=True, exist_ok=True)
        shared_models = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "models"
        if not (home / "models").exists():
            (home / "models").symlink_to(shared_models, target_is_directory=True)
        self.env = {**os.environ, "BENTOML_HOME": str(home), **env}
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def runner(cls, workdir: Path, env: dict[str, str]) -> Server:
        """The FHE runner served on its own, as docs/sagemaker.md starts it: ready at BentoML's /readyz."""
        return cls(
            workdir,
            env,
            target="fhe_bento.runners.fhe_runner:FHERunner",
            ready_path="/readyz",
            serve_args=("--timeout-keep-alive", str(RUNNER_KEEPALIVE_SECONDS)),
        )

    def start(self, timeout: float = 180.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                self.target,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.serve_args,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 30 s, as SageMaker stops a container; returns the exit status, or
        None when SIGTERM was not enough (or the server was not running)."""
        status = None
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                status = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        return status

    def kill(self) -> None:
        """SIGKILL the whole server at once, as a crashed host or container would die. BentoML's workers
        run in sessions of their own, so the process group alone would leave them serving. Every process is
        frozen (SIGSTOP) before any is killed: otherwise a worker could see its runner die first and answer
        503 runner_unavailable, which a dead host never does."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        for signal_name in ("SIGSTOP", "SIGKILL"):
            for proc in procs:
                # a short-lived child (concrete runs addr2line) may have exited meanwhile
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(getattr(signal, signal_name))
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait()
        self.proc = None

    def worker(self):
        """The psutil process of the (first) BentoML worker: the one holding the FHE runner, whether this
        serves the whole service or the runner alone."""
        import psutil

        return next(
            p
            for p in psutil.Process(self.proc.pid).children()
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
        )

    def engines(self) -> list:
        """The psutil processes of the worker's FHE engines (children of its forkserver)."""
        import psutil

        found = []
        for proc in self.worker().children(recursive=True):
            try:
                if "forkserver" in " ".join(proc.parent().cmdline()):
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found

    def resident_bytes(self) -> int:
        """Proportional set size of the whole server (arbiter, workers, engines, verifiers): memory that its
        processes share, such as the libraries their forkserver loaded, is counted once."""
        import psutil

        root = psutil.Process(self.proc.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a short-lived child exited meanwhile
                total += proc.memory_full_info().pss
        return total

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over all series whose labels include `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


class MotoServer:
    """moto in server mode on 127.0.0.1: a real S3 + SageMaker HTTP endpoint for boto3. It runs through
    `harness.moto_sagemaker_update`, which adds SageMaker's UpdateEndpoint (moto has none) and changes
    nothing else. moto's request recorder (`/moto-api/recorder/...`) writes to a file of its own."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="fhe-bento-moto-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.moto_sagemaker_update", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "MOTO_RECORDER_FILEPATH": str(self.workdir / "recording.jsonl")},
        )
        for _ in range(150):
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def env(self) -> dict[str, str]:
        """What boto3 (in this process or a child) needs to talk to it."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)
