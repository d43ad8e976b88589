"""Limits every request meets before any route runs: the size of its request line and headers
(`FHE_BENTO_MAX_HEADER_BYTES`, 431) and its whole time (`FHE_BENTO_REQUEST_TIMEOUT`, 504).

A plain ASGI middleware rather than a Starlette `BaseHTTPMiddleware`, so that bodies keep streaming.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runners.errors import FHEBentoError

log = logging.getLogger("bentoml.fhe_bento.service")


class RequestLimits:
    def __init__(self, app: ASGIApp, max_header_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > self.max_header_bytes:
            error = FHEBentoError(431, "headers_too_large",
                                  f"the request line and headers are {size} bytes; the limit is {self.max_header_bytes}")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            async with asyncio.timeout(self.timeout):
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            log.warning("request over FHE_BENTO_REQUEST_TIMEOUT (%ss): %s %s", self.timeout, scope["method"], scope["path"])
            if started:  # the answer is half sent: all that is left is to cut the connection
                raise
            error = FHEBentoError(504, "request_timeout", f"the request took over {self.timeout} s")
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
