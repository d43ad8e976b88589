"""Running the real image as SageMaker runs it (podman, host network, port 8080), for the tests."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fhe_bento.protocol.names import ATTRIBUTES_HEADER

PORT = 8080  # SageMaker's
URL = f"http://127.0.0.1:{PORT}"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN = [*PODMAN, "run", "--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def wait_for_ping(timeout: float = 300) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{URL}/ping", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the container never answered /ping with 200")


@contextmanager
def running(image: str, model_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """The image serving `model_dir` as /opt/ml/model (read only), as SageMaker starts it: `IMAGE serve`.
    Its log is kept beside the model folder."""
    name = f"fhe-bento-test-{uuid.uuid4().hex[:8]}"
    flags = [
        item for key, value in {"PORT": str(PORT), **(env or {})}.items() for item in ("-e", f"{key}={value}")
    ]
    subprocess.run(
        [*RUN, "-d", "--name", name, *flags, "-v", f"{model_dir}:/opt/ml/model:ro", image, "serve"],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        (model_dir.parent / f"{name}.log").write_text(logs.stdout + logs.stderr)  # kept for post-mortems
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)


def invoke(
    attributes: str, body: bytes = b"{}", content_type: str = "application/octet-stream"
) -> httpx.Response:
    return httpx.post(
        f"{URL}/invocations",
        content=body,
        timeout=300,
        headers={"Content-Type": content_type, ATTRIBUTES_HEADER: attributes},
    )
