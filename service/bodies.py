"""Reading request bodies within limits: checked against Content-Length first, then counted while
streaming whatever the framing (chunked, or a Content-Length that lies), so an oversized body is refused
before it is held in memory or on disk; a body that stalls for `FHE_BENTO_BODY_IDLE_SECONDS` between two
chunks is refused with 408. Every body is read through `limited_chunks`."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

from runners.errors import FHEBentoError, bad_request, too_large
from runners.settings import get_settings


def require_content_type(request: Request, *allowed: str) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in allowed:
        raise FHEBentoError(
            415, "unsupported_media_type", f"send Content-Type {' or '.join(allowed)}, not {media_type or 'nothing'}"
        )


def declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"the body is {declared} bytes; the limit here is {limit}")


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they come; 408 when the client stalls between two of them."""
    stream = request.stream()
    idle = get_settings().body_idle_seconds
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise FHEBentoError(408, "body_timeout", f"no body bytes came for {idle} s") from None
        yield chunk


def limited_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks (see `body_chunks`) within `limit`: 413 at once when Content-Length is over it
    (before anything is read or spooled), else as soon as their running total passes it, whatever the
    framing; 400 when the client leaves mid-body."""
    declared_length(request, limit)
    return _counted(body_chunks(request), limit)


async def _counted(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise too_large(f"the body is over the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise bad_request("incomplete_body", "the client closed the connection before the body ended") from None


async def read_limited(request: Request, limit: int) -> bytes:
    body = b"".join([chunk async for chunk in limited_chunks(request, limit)])
    if not body:
        raise bad_request("empty_body", "the request body is empty")
    return body


async def spool_limited(request: Request, limit: int, directory: Path) -> tuple[Path, str, int]:
    """Stream the body to a file under `directory`; see `spool_chunks`."""
    return await spool_chunks(limited_chunks(request, limit), limit, directory)


async def spool_chunks(chunks: AsyncIterator[bytes], limit: int, directory: Path) -> tuple[Path, str, int]:
    """Write chunks to a new file under `directory`, hashing as they come; returns (path, sha256 hex,
    size). The caller deletes the file; on any error the partial file is removed here."""
    path = directory / f"upload-{uuid.uuid4().hex}"
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(f"the body is over the limit of {limit} bytes")
                digest.update(chunk)
                fh.write(chunk)
        if size == 0:
            raise bad_request("empty_body", "the request body is empty")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size
