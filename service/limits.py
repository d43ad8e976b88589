"""Limits every request meets before any route runs: the size of its request line and headers
(`FHE_BENTO_MAX_HEADER_BYTES`, 431), its whole time (`FHE_BENTO_REQUEST_TIMEOUT`, 504), and its client's
presence: once the body is read, a client that disconnects cancels the request, so that the runner drops
its rows that have not started (see `FHERunner._rows`). `request_deadline()` tells the operations when the
request's time runs out.

A plain ASGI middleware rather than a Starlette `BaseHTTPMiddleware`, so that bodies keep streaming.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhe_bento.contract.errors import FHEBentoError
from fhe_bento.service.responses import error_response

log = logging.getLogger("bentoml.fhe_bento.service")
CLIENT_CLOSED_REQUEST = 499
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("fhe_bento_request_deadline")


def request_deadline(timeout: float) -> float:
    """The wall-clock time (time.time()) at which the current request's time runs out."""
    return _DEADLINE.get(time.time() + timeout)


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
            error = FHEBentoError(
                "headers_too_large",
                f"the request line and headers are {size} bytes; the limit is {self.max_header_bytes}",
            )
            await error_response(error, scope["method"])(scope, receive, send)
            return

        started = False
        body_read = asyncio.Event()
        client_gone = False
        handler = asyncio.current_task()
        assert handler is not None  # an ASGI app runs in a task

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def tracking_receive() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read.set()
            return message

        async def watch_client() -> None:
            nonlocal client_gone
            await body_read.wait()
            if (await receive())["type"] == "http.disconnect" and not started:
                client_gone = True
                handler.cancel()

        _DEADLINE.set(time.time() + self.timeout)
        watcher = asyncio.create_task(watch_client())
        try:
            async with asyncio.timeout(self.timeout):
                await self.app(scope, tracking_receive, tracking_send)
        except asyncio.CancelledError:
            if not client_gone:
                raise
            handler.uncancel()
            log.info("client went away: %s %s cancelled", scope["method"], scope["path"])
            # Nobody receives this (uvicorn drops what is sent to a closed connection), but every request must
            # answer: BentoML's own timeout middleware holds the request until the app's first message (or its
            # 10-minute deadline), and that held request would stall the server's graceful stop. The access
            # log records nginx's 499, "client closed request".
            await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)
        except TimeoutError:
            log.warning(
                "request over FHE_BENTO_REQUEST_TIMEOUT (%ss): %s %s",
                self.timeout,
                scope["method"],
                scope["path"],
            )
            if started:  # the answer is half sent: all that is left is to cut the connection
                raise
            error = FHEBentoError("request_timeout", f"the request took over {self.timeout} s")
            await error_response(error, scope["method"])(scope, receive, send)
        finally:
            watcher.cancel()
