"""Connection limits the HTTP server lacks, and JSON for the errors answered at that level.

uvicorn's httptools protocol puts no limit on the size of a request's headers (a client sent 263 MB of
header lines), sets no timer before a request's headers or body are complete (one byte every two seconds
kept a connection open for good, or a connection that sends nothing at all), and answers malformed requests
in plain text. :func:`protocol_class` adds, per connection:

* a cap on open connections (503 and close past ``max_connections``), and on those of one client address
  (past ``max_connections_per_client``; a trusted proxy's connections are not capped per client);
* header size and count limits (431 and close);
* a header timer (408 and close): from the connection's start, or a keep-alive request's first byte, to the
  end of its headers; it also closes connections that never send anything;
* a body timer (408 and close) from the end of the headers to the end of the body.

Idle keep-alive connections are closed by uvicorn itself (``timeout_keep_alive``). :func:`uvicorn_config`
is the one place where the server's uvicorn settings are made, for ``fmnist serve`` and ``serve_in_thread``.
"""
from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("fmnist.apps.serve")


class _TooManyHeaders(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the limits of ``settings`` (a :class:`~fmnist.apps.serve.settings.Settings`, set on
    the subclass that :func:`protocol_class` makes)."""

    settings = None
    per_client: dict = {}  # open connections by client address (each server's subclass has its own)

    def connection_made(self, transport) -> None:
        self._timer = None
        self._awaiting_head = True  # between requests or inside a request's headers
        self._head_done = False  # a request's headers ended in the data being parsed
        self._head_bytes = self._raw_head_bytes = 0
        self._header_count = 0
        self._problem: tuple[int, str] | None = None
        self._peer = None
        super().connection_made(transport)
        limit = self.settings.max_connections
        if len(self.connections) > limit:
            self._refuse(503, f"server busy: {limit} connections already open; retry in 1 s",
                         [(b"retry-after", b"1")])
            return
        peer = str(self.client[0]) if self.client else None
        if peer is not None and peer not in self.settings.trusted_proxies:
            self._peer = peer
            count = self.per_client[peer] = self.per_client.get(peer, 0) + 1
            limit = self.settings.max_connections_per_client
            if count > limit:
                self._refuse(503, f"too many connections from your address ({limit}, the limit per client); "
                                  "retry in 1 s", [(b"retry-after", b"1")])
                return
        self._arm(self.settings.header_timeout, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._peer is not None:
            count = self.per_client.get(self._peer, 0) - 1
            if count > 0:
                self.per_client[self._peer] = count
            else:
                self.per_client.pop(self._peer, None)
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        counting, self._head_done = self._awaiting_head, False
        super().data_received(data)
        # The parser holds a header line until it ends: count the raw bytes of unfinished headers too (a
        # chunk that ends them is not counted), so that at most the limit and one chunk are ever held.
        if counting and self._awaiting_head and not self._head_done and not self.transport.is_closing():
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.settings.max_header_bytes:
                self._refuse(*self._too_large())

    def _too_large(self) -> tuple[int, str]:
        return 431, (f"request headers too large: the limit is {self.settings.max_header_bytes:,} bytes for "
                     "the request line and headers")

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.settings.max_header_bytes:
            self._problem = self._too_large()
            raise _TooManyHeaders  # the parser stops; uvicorn then calls send_400_response

    # --- parser callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a keep-alive connection's next request: its headers are timed from here
            self._arm(self.settings.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.settings.max_headers:
            self._problem = (431, f"too many header fields: the limit is {self.settings.max_headers}")
            raise _TooManyHeaders
        self._count(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head, self._head_done = False, True
        self._arm(self.settings.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._awaiting_head, self._header_count = True, 0
        self._head_bytes = self._raw_head_bytes = 0
        super().on_message_complete()

    # --- refusals ------------------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser rejects, in JSON (and 431 when a limit was passed)."""
        status, detail = self._problem or (400, "invalid HTTP request: malformed request line, headers or "
                                                "chunked body")
        self._refuse(status, detail)

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request is slow while the previous one is answered: close after that answer.
            self.cycle.keep_alive = False
            return
        self._refuse(408, f"request headers not received within {self.settings.header_timeout:g} s")

    def _body_timed_out(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_started:  # answered already (e.g. 413); the rest never came
            self.transport.close()
            return
        # The application waits for the rest of the body: it sees the client gone, and answers nobody.
        cycle.disconnected = True
        cycle.message_event.set()
        self._refuse(408, f"request body not received within {self.settings.body_timeout:g} s")

    def _refuse(self, status: int, detail: str, headers=()) -> None:
        """Answer ``status`` with JSON ``{"detail": ...}`` and close the connection."""
        if self.transport.is_closing():
            return
        log.info("%s: %d %s", f"{self.client[0]}:{self.client[1]}" if self.client else "client", status, detail)
        body = json.dumps({"detail": detail}).encode()
        lines = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
                            *headers]:
            lines += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*lines, b"\r\n", body]))
        self.transport.close()
        self._disarm()

    def _arm(self, delay: float, callback) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def protocol_class(settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class uvicorn should use (its ``http`` setting) for a server with these settings."""
    return type("FmnistHttpProtocol", (LimitedHttpToolsProtocol,), {"settings": settings, "per_client": {}})


def uvicorn_config(app, host: str, port: int, **overrides):
    """uvicorn's settings for serving ``app`` (made by ``create_app``): its limits, its protocol."""
    import uvicorn

    s = app.state.settings
    # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from any local peer as the client's
    # address, and a client could pick its own; the per-client limits read it from trusted proxies only.
    options = dict(host=host, port=port, http=protocol_class(s), timeout_keep_alive=s.keep_alive_timeout,
                   timeout_graceful_shutdown=10, proxy_headers=False)
    options.update(overrides)
    return uvicorn.Config(app, **options)
