"""Request limits that protect the server: body size (checked while streaming) and in-flight requests.

Both answer with JSON ``{"detail": "..."}`` like every other error of the API.
"""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit; FastAPI turns it into a 413."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_text(limit), headers={"Connection": "close"})


def _too_large_text(limit: int) -> str:
    return f"request body too large: the limit is {limit:,} bytes ({limit / 1e6:g} MB)"


class BodySizeLimit:
    """Pure ASGI middleware: refuse request bodies over ``max_body`` bytes with 413.

    A declared ``Content-Length`` over the limit is refused before a single body byte is read. Otherwise
    (chunked uploads, or a client that lies) the bytes are counted as they stream in and the request fails
    as soon as the count passes the limit, so at most ``max_body`` plus one network chunk is ever held.
    The 413 says ``Connection: close`` so the server drops the rest of the upload instead of draining it.
    """

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await self._refuse(send)
            return

        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # Raised somewhere that did not turn it into a response (e.g. outside FastAPI's body parsing).
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": _too_large_text(self.max_body)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects malformed framing itself; count the bytes anyway
    return None


class Gate:
    """Counts requests in flight on the predict endpoints; refuses new ones past ``limit``.

    Everything runs on the event loop thread, so a plain counter is race-free.
    """

    def __init__(self, limit: int, retry_after: int = 1):
        self.limit = int(limit)
        self.retry_after = int(retry_after)
        self.active = 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise HTTPException(503, f"server busy: {self.limit} predictions already in progress; retry in "
                                     f"{self.retry_after} s", headers={"Retry-After": str(self.retry_after)})
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
