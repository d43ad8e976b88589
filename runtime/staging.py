"""Spool files: request bodies and assembled key uploads written to the staging folder before they are
verified. Both the HTTP service and the key service write them; this module names and clears them."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from fhe_bento.runtime.settings import STAGING_GRACE_SECONDS, Settings

log = logging.getLogger("bentoml.fhe_bento.staging")
SpoolKind = Literal["upload", "assembled"]
KINDS: tuple[SpoolKind, ...] = ("upload", "assembled")


def spool_path(directory: Path, kind: SpoolKind) -> Path:
    """A fresh spool file's name; the writer deletes it when its request ends."""
    return directory / f"{kind}-{uuid.uuid4().hex}"


def clear_stale(settings: Settings) -> int:
    """Delete the spool files that a crashed process left behind; returns how many. Only files untouched
    for longer than a whole request may go: a spool file lives no longer than the request that wrote it,
    and another worker may be writing or verifying a younger one right now."""
    directory = settings.staging_path()
    cutoff = time.time() - settings.request_timeout - STAGING_GRACE_SECONDS
    removed = 0
    for path in [path for kind in KINDS for path in directory.glob(f"{kind}-*")]:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # its request ended meanwhile and removed it
            continue
    if removed:
        log.info("removed %d spool files left in %s by an earlier process", removed, directory)
    return removed
