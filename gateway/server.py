"""uvicorn, with a drain on SIGTERM that loses no accepted request, and limits on connections.

uvicorn alone would stop accepting connections at once, and so cut the workers off from the
jobs of the requests it still waits to answer. Here the first SIGTERM (or Ctrl-C) drains
instead: new client requests get 503 (``/health`` too, so readiness probes take the replica
out), workers keep leasing and posting until every client request in flight is answered (or
``request_timeout_s`` passes), then lease long-polls are woken and uvicorn shuts down. A second
signal stops at once.

uvicorn alone would also wait forever for a request's head, and read any number of headers of
any size before the app runs. Here a connection has EMBEDQ_HEAD_TIMEOUT_S to send a request's
line and headers (408 and closed after), at most EMBEDQ_MAX_HEADERS headers of
EMBEDQ_MAX_HEADER_BYTES in all (431 and closed beyond), and the server holds at most
EMBEDQ_MAX_CONNECTIONS connections (503 at once beyond). The body's own time limit is the app's
(http.read_body).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")
DRAIN_POLL_S = 0.05
HEAD_SLACK = 16384  # the request line, and separators, beyond the headers' own bytes


def server_config(app: Starlette, settings: GatewaySettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        loop="uvloop",  # the C event loop, named so a missing one fails loudly
        http=limited_protocol(settings),  # httptools' C parser, with limits
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=5,  # by then every client request was answered (see DrainingServer)
    )


def limited_protocol(settings: GatewaySettings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with the head's time, count and size limits of ``settings``."""
    return type("LimitedHttpProtocol", (_LimitedHttpProtocol,), {
        "head_timeout_s": settings.head_timeout_s, "max_headers": settings.max_headers,
        "max_header_bytes": settings.max_header_bytes,
    })  # fmt: skip


class _LimitedHttpProtocol(HttpToolsProtocol):
    head_timeout_s: float
    max_headers: int
    max_header_bytes: int

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = self._head_bytes = self._head_received = 0
        self._in_head = True
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_received += len(data)
        super().data_received(data)
        # The parser keeps a header that has not ended yet: bound what it keeps, chunk by chunk.
        if self._in_head and self._head_received > self.max_header_bytes + HEAD_SLACK and not self.transport.is_closing():
            self._send_and_close(431, f"at most {self.max_headers} headers of {self.max_header_bytes} bytes in all")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_count = self._head_bytes = 0
        self._in_head = True
        self._arm_head_timer()  # a keep-alive connection's next request: its head is timed too

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        self._head_bytes += len(name) + len(value)
        if self._head_count > self.max_headers or self._head_bytes > self.max_header_bytes:
            self._refusal = (431, f"at most {self.max_headers} headers of {self.max_header_bytes} bytes in all")
            raise ValueError("request header fields too large")  # stops the parser: see send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._in_head = False
        self._head_received = 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser gave up on; ours when a limit stopped it."""
        if self._refusal is None:
            return super().send_400_response(msg)
        self._send_and_close(*self._refusal)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._send_and_close(408, f"the request's line and headers did not arrive within {self.head_timeout_s:g}s")

    def _send_and_close(self, status: int, why: str) -> None:
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = why.encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self.transport.close()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Starlette, drain_timeout_s: float):
        super().__init__(config)
        self._state = app.state
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._state.draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout_s
        log.info("draining: refusing new requests, answering %d in flight", self._state.in_flight)
        while self._state.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._state.in_flight:
            log.warning("drain timed out with %d requests in flight", self._state.in_flight)
        await self._state.queue.close_leases()
        self.should_exit = True
