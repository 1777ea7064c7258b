"""Request limits that protect the server, as ASGI middleware and helpers: the Host allow-list, body size
(checked while streaming), the multipart body's end, requests in flight, and a JSON answer for any error.

All answer with JSON ``{"detail": "..."}`` like every other error of the API. (Limits on the connection
itself, such as header size and timeouts, are in :mod:`fmnist.apps.serve.protocol`.)
"""
from __future__ import annotations

import email.message
import json
import logging

from starlette.exceptions import HTTPException

from fmnist.apps.serve.settings import host_of

log = logging.getLogger("fmnist.apps.serve")


async def send_json(send, status: int, detail: str, headers=()) -> None:
    """Answer with ``{"detail": detail}``; ``headers``: extra (name, value) byte pairs."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class JsonErrors:
    """Outermost middleware: an exception no one handled becomes a logged JSON 500 for its own request only.

    (Starlette's own last-resort handler answers too, but then re-raises, and uvicorn drops the connection.)
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # half an answer is out: only closing the connection can tell the client
                raise
            log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await send_json(send, 500, "internal server error")


class HostAllowList:
    """Answer only requests whose ``Host`` is one of ``hosts`` (any port), else 400.

    A web page cannot make a browser send a foreign Host header, so this stops DNS rebinding: a page on
    attacker.example whose name is re-pointed at 127.0.0.1 still sends ``Host: attacker.example``.
    ``"*"`` among the hosts turns the check off.
    """

    def __init__(self, app, hosts):
        self.app = app
        self.hosts = frozenset(hosts)
        self.any = "*" in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        if header is None:
            await send_json(send, 400, "missing Host header")
            return
        host = host_of(header.decode("latin-1"))
        if host not in self.hosts:
            await send_json(send, 400, f"host {host[:100]!r} is not served here: this server answers to "
                                       f"{', '.join(sorted(self.hosts))} (see --allowed-hosts)")
            return
        await self.app(scope, receive, send)


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
        await send_json(send, 413, _too_large_text(self.max_body), [(b"connection", b"close")])


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server rejects malformed framing itself; count the bytes anyway
    return None


class Gate:
    """Counts requests in some stage (``what``: "predictions", "uploads"); refuses new ones past ``limit``.

    Everything runs on the event loop thread, so a plain counter is race-free.
    """

    def __init__(self, limit: int, what: str = "predictions", retry_after: int = 1):
        self.limit = int(limit)
        self.what = what
        self.retry_after = int(retry_after)
        self.active = 0

    def enter(self) -> None:
        if self.active >= self.limit:
            raise HTTPException(503, f"server busy: {self.limit} {self.what} already in progress; retry in "
                                     f"{self.retry_after} s", headers={"Retry-After": str(self.retry_after)})
        self.active += 1

    def leave(self) -> None:
        self.active -= 1


class ClientGate:
    """Like :class:`Gate`, per client address: refuses a client's new request past ``limit`` of its own in
    progress, so that one client's slow uploads leave room for the others."""

    def __init__(self, limit: int, what: str = "uploads", retry_after: int = 1):
        self.limit = int(limit)
        self.what = what
        self.retry_after = int(retry_after)
        self.active: dict[str, int] = {}

    def enter(self, client: str) -> None:
        count = self.active.get(client, 0)
        if count >= self.limit:
            raise HTTPException(503, f"too many {self.what} in progress from your address ({self.limit}, the "
                                     f"limit per client); retry in {self.retry_after} s",
                                headers={"Retry-After": str(self.retry_after)})
        self.active[client] = count + 1

    def leave(self, client: str) -> None:
        count = self.active.get(client, 0) - 1
        if count > 0:
            self.active[client] = count
        else:
            self.active.pop(client, None)


def client_address(scope, trusted_proxies=()) -> str:
    """Who sent a request, for the per-client limits: the TCP peer's address; behind a trusted proxy (the
    peer is one of ``trusted_proxies``), the right-most address of ``X-Forwarded-For`` that is not itself a
    trusted proxy. The header is ignored from any other peer: a client could write anything there."""
    peer = scope.get("client")
    address = str(peer[0]) if peer else "unknown"
    if address not in trusted_proxies:
        return address
    forwarded = b",".join(v for k, v in scope.get("headers", ()) if k == b"x-forwarded-for")
    for hop in reversed(forwarded.decode("latin-1").split(",")):
        hop = hop.strip()
        if hop and hop not in trusted_proxies:
            return hop[:64]
    return address


def multipart_boundary(content_type: str) -> bytes | None:
    """The ``boundary`` parameter of a multipart Content-Type, or None."""
    message = email.message.Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    return boundary.encode("latin-1") if isinstance(boundary, str) and boundary else None


class BodyWatch:
    """Follows a multipart body as it arrives (wraps ``receive``): calls ``on_end`` once when it has all
    come in (or the client left), and refuses it with 400 if it ends without its closing boundary.

    (The multipart parser accepts such a body, and the request then fails later as a missing field: 422.)
    """

    def __init__(self, receive, boundary: bytes | None, on_end):
        self._receive = receive
        self._close = b"--" + boundary + b"--" if boundary else None
        self._seen = self._close is None
        self._tail = b""
        self._on_end = on_end

    async def receive(self):
        message = await self._receive()
        if message["type"] != "http.request":
            self.end()
            return message
        body = message.get("body", b"")
        if not self._seen and body:
            window = self._tail + body
            self._seen = self._close in window
            self._tail = window[-(len(self._close) - 1):]
        if not message.get("more_body", False):
            self.end()
            if not self._seen:
                raise HTTPException(400, "malformed multipart body: it ends without its closing boundary "
                                         f"('--{self._close[2:-2].decode('latin-1')[:80]}--')")
        return message

    def end(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()
