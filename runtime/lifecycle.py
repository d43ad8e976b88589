"""Stopping the whole server when its FHE runner cannot be recovered, with a non-zero exit status, so
that SageMaker, Kubernetes or a restart policy replaces it.

A worker cannot exit the server itself: it asks its parent, BentoML's arbiter, to stop (SIGTERM, which the
arbiter handles even as a container's PID 1), after leaving a marker named by the arbiter's pid. The
arbiter imported `fhe_bento.service.app` to start its workers, so it runs `exit_nonzero_if_stopped`'s hook when it
exits, finds its marker and turns its exit status 0 into `STOPPED_STATUS`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger("bentoml.fhe_bento.lifecycle")
STOPPED_STATUS = 3


def _marker(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"fhe-bento-stopped-{pid}"


def stop_server(reason: str) -> None:
    """Stop the BentoML server this worker belongs to; it then exits with STOPPED_STATUS."""
    arbiter = psutil.Process(os.getppid())
    log.critical("stopping the server (exit status %d): %s", STOPPED_STATUS, reason)
    _marker(arbiter.pid).write_text(reason)
    arbiter.send_signal(signal.SIGTERM)


def _exit_if_marked() -> None:
    marker = _marker(os.getpid())
    if marker.exists():
        marker.unlink()
        os._exit(STOPPED_STATUS)


def exit_nonzero_if_stopped() -> None:
    """Register, in every process that imports the service, the exit hook that only the arbiter's marker fires."""
    atexit.register(_exit_if_marked)
