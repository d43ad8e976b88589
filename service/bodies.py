"""Reading request bodies within limits: checked against Content-Length first, then counted while
streaming whatever the framing (chunked, or a Content-Length that lies), so an oversized body is refused
before it is held in memory or on disk; a body that stalls for `FHE_BENTO_BODY_IDLE_SECONDS` between two
chunks is refused with 408. Every body is read through `limited_chunks`.

Each operation's body is declared once, as a `Body` below (content types, limit, in memory or spooled):
the native route and SageMaker's `/invocations` read it by the same declaration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.protocol import transform, wire
from fhe_bento.protocol.names import OCTET_STREAM
from fhe_bento.runtime import staging
from fhe_bento.service.settings import ServiceSettings


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_content_type(request: Request, *allowed: str) -> None:
    sent = media_type(request)
    if sent not in allowed:
        raise FHEBentoError(
            "unsupported_media_type", f"send Content-Type {' or '.join(allowed)}, not {sent or 'nothing'}"
        )


def settings_of(request: Request) -> ServiceSettings:
    """The settings the service was built with (`service/app.py`)."""
    settings: ServiceSettings = request.app.state.settings
    return settings


def declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FHEBentoError("payload_too_large", f"the body is {declared} bytes; the limit here is {limit}")


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body's chunks as they come; 408 when the client stalls between two of them."""
    stream = request.stream()
    idle = settings_of(request).body_idle_seconds
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise FHEBentoError("body_timeout", f"no body bytes came for {idle} s") from None
        yield chunk


def limited_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks (see `body_chunks`) within `limit`: 413 at once when Content-Length is over it
    (before anything is read or spooled), else as soon as their running total passes it, whatever the
    framing; 400 when the client leaves mid-body."""
    declared_length(request, limit)
    return _counted(body_chunks(request), limit)


async def _counted(chunks: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise FHEBentoError("payload_too_large", f"the body is over the limit of {limit} bytes")
            yield chunk
    except ClientDisconnect:
        raise FHEBentoError(
            "incomplete_body", "the client closed the connection before the body ended"
        ) from None


async def read_limited(request: Request, limit: int) -> bytes:
    body = b"".join([chunk async for chunk in limited_chunks(request, limit)])
    if not body:
        raise FHEBentoError("empty_body", "the request body is empty")
    return body


async def spool_limited(request: Request, limit: int, directory: Path) -> Path:
    """Stream the body (see `limited_chunks`) to a new file under `directory`. The caller deletes the file;
    on any error the partial file is removed here."""
    path = staging.spool_path(directory, "upload")
    size = 0
    try:
        with path.open("wb") as fh:
            async for chunk in limited_chunks(request, limit):
                size += len(chunk)
                fh.write(chunk)
        if size == 0:
            raise FHEBentoError("empty_body", "the request body is empty")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Body:
    """What an operation reads from its request."""

    content_types: tuple[str, ...]
    limit: Callable[[ServiceSettings], int]
    spool: bool = False  # to a file in the staging directory (the caller deletes it), else into memory

    async def read(self, request: Request) -> bytes | Path:
        require_content_type(request, *self.content_types)
        settings = settings_of(request)
        if self.spool:
            return await spool_limited(request, self.limit(settings), settings.staging_path())
        return await read_limited(request, self.limit(settings))

    async def read_bytes(self, request: Request) -> bytes:
        """`read` of a body held in memory (not spooled)."""
        body = await self.read(request)
        assert isinstance(body, bytes), "a spooled body is read with read()"
        return body


KEY = Body((OCTET_STREAM,), lambda s: s.max_key_bytes)
KEY_PART = Body((OCTET_STREAM,), lambda s: s.max_part_bytes)
CIPHERTEXT = Body((OCTET_STREAM,), lambda s: s.max_ciphertext_bytes)
BATCH = Body((wire.CONTENT_TYPE, OCTET_STREAM), lambda s: s.max_batch_bytes)
TRANSFORM = Body((transform.CONTENT_TYPE,), lambda s: s.max_batch_bytes)
ENVELOPE = Body(
    (wire.ENVELOPE_CONTENT_TYPE, OCTET_STREAM),
    lambda s: s.max_key_bytes + s.max_batch_bytes + wire.MAX_ENVELOPE_HEADER + 16,
    spool=True,
)
