"""The FHE runner's heartbeat: how the HTTP service tells a busy runner from a dead one without a call.

A call to the runner (its `ready()`) waits behind every request already queued on the hop, so under a
burst it timed out and `/ping` said 503 while the runner was only busy. Instead, each runner worker's event
loop rewrites a tiny file every `BEAT_SECONDS`: "1" while its engine is ready, "0" while it (re)starts.
The HTTP service reads the files, which costs no request, so a saturated runner still gives the signal:
- a worker whose process is gone (or a zombie) is down at once;
- a worker whose last beat is older than `STALE_SECONDS` is down: its event loop or process hangs;
- the runner is up when every one of its `FHE_BENTO_WORKERS` workers beats, and ready when every engine is.

Both sides are children of one BentoML arbiter, so the files live in a folder named by the arbiter's pid.
A runner served elsewhere (`FHE_BENTO_RUNNER_URL`) has no such folder: the service probes its `/readyz`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

BEAT_SECONDS = 0.25
STALE_SECONDS = 3.0  # twelve missed beats: far beyond a busy event loop's delay, short enough for /ping
_PREFIX = "runner-"


def heartbeat_dir() -> Path:
    """The heartbeat folder of the BentoML server this worker belongs to (its arbiter is the parent)."""
    return Path(tempfile.gettempdir()) / f"fhe-bento-heartbeat-{os.getppid()}"


def _beat_path(folder: Path, pid: int) -> Path:
    return folder / f"{_PREFIX}{pid}"


def _write_beat(path: Path, ready: bool) -> None:
    partial = path.with_name(f".{path.name}.tmp")  # not matched by the readers' glob
    partial.write_text("1" if ready else "0")
    partial.replace(path)  # atomic: a reader never sees a half-written beat; the new file's mtime is the beat


async def beat_forever(ready: Callable[[], bool], folder: Path | None = None) -> None:
    """Run in a runner worker's event loop until cancelled: a beat that comes late means a loop that stalls."""
    folder = folder or heartbeat_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = _beat_path(folder, os.getpid())
    try:
        while True:
            _write_beat(path, ready())  # inline: the default thread pool may be busy with key-store calls
            await asyncio.sleep(BEAT_SECONDS)
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the last worker out removes the folder
            folder.rmdir()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def runner_state(expected_workers: int, folder: Path | None = None) -> bool | None:
    """True when every runner worker beats with its engine ready, False while one's engine (re)starts,
    None when the runner is down (a worker missing, dead or silent)."""
    folder = folder or heartbeat_dir()
    states = []
    for path in folder.glob(f"{_PREFIX}*"):
        pid = int(path.name.removeprefix(_PREFIX))
        if not _alive(pid):
            path.unlink(missing_ok=True)  # a worker that died (and was maybe replaced by a new pid)
            continue
        with contextlib.suppress(FileNotFoundError):  # the worker is stopping
            if time.time() - path.stat().st_mtime <= STALE_SECONDS:
                states.append(path.read_text() == "1")
    if len(states) < expected_workers:
        return None
    return all(states)
