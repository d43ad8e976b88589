"""The test run's scratch folder: model store, servers' files, the client venv (about 6 GB, CUDA torch) and,
through TMPDIR, every temporary folder the run and its servers make (concrete leaves one per model load).

A run removes its folder when it ends; a run that was killed cannot, so each run first removes the folders
of runs whose process is gone. CI runs on machines that earlier runs used: left behind, these folders
filled the disk there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "fhe-bento-tests-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned(root: Path) -> list[Path]:
    """Remove the scratch folders under `root` whose run's process no longer exists; returns them."""
    removed = []
    for path in root.glob(PREFIX + "*"):
        pid = path.name.removeprefix(PREFIX)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def open_session_dir() -> Path:
    """This run's scratch folder, named by its pid, with TMPDIR pointed inside it (here and in children),
    removed when this process exits."""
    root = Path(tempfile.gettempdir())
    remove_abandoned(root)
    path = root / f"{PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # a pid reused from a run that did not clean up
    path.mkdir()
    return use_as_scratch(path)


def use_as_scratch(path: Path) -> Path:
    """Point TMPDIR inside `path` (here and in children) and remove `path` when this process exits."""
    (path / "tmp").mkdir()
    os.environ["TMPDIR"] = str(path / "tmp")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    # atexit runs the last registered first: registered before multiprocessing is imported, this runs after
    # multiprocessing removes its own temporary folder (in TMPDIR) at exit.
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
