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
EMBEDQ_MAX_HEADER_BYTES in all (431 and closed beyond). The body's own time limit is the app's
(http.read_body).

Connections: the server holds at most EMBEDQ_MAX_CONNECTIONS, and never more than its file
limit leaves room for (``connection_cap``: it raises its soft limit to the hard one first, as Go
programs do, and keeps a quarter, at least 64, for Redis, files and the listening socket). Past
the cap a new connection takes the place of the one that has waited longest without sending a
request (a connection that never sent a byte, or a keep-alive one idle since its last answer):
strangers who open connections and send nothing cannot lock out clients that send requests,
and no connection is refused while one is idle. Only when every held connection is in the
middle of a request does the new one get 503.
"""

from __future__ import annotations

import asyncio
import logging
import resource
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
        http=limited_protocol(settings),  # httptools' C parser, with limits (and the connection cap)
        timeout_graceful_shutdown=5,  # by then every client request was answered (see DrainingServer)
    )


def connection_cap(wanted: int) -> int:
    """How many connections to hold: ``wanted``, or fewer if the file limit leaves less room.
    Raises the soft file limit to the hard one (at most 2**20) first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(1 << 20, hard if hard != resource.RLIM_INFINITY else 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file limit from %d to %d: %s", soft, target, exc)
    cap = max(16, min(wanted, soft - max(64, soft // 4)))
    log.info("holding at most %d connections (file limit %d; EMBEDQ_MAX_CONNECTIONS %d)", cap, soft, wanted)
    return cap


def limited_protocol(settings: GatewaySettings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with the head's time, count and size limits of ``settings``,
    and the connection cap (its own record of who waits, shared by this server's connections)."""
    return type("LimitedHttpProtocol", (_LimitedHttpProtocol,), {
        "head_timeout_s": settings.head_timeout_s, "max_headers": settings.max_headers,
        "max_header_bytes": settings.max_header_bytes, "cap": connection_cap(settings.max_connections),
        "waiting": {},
    })  # fmt: skip


class _LimitedHttpProtocol(HttpToolsProtocol):
    head_timeout_s: float
    max_headers: int
    max_header_bytes: int
    cap: int
    # Connections between requests (no head yet, or idle after an answer), longest waiting
    # first: a dict, for its order and O(1) removal.
    waiting: dict[_LimitedHttpProtocol, None]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = self._head_bytes = self._head_received = 0
        self._in_head = True
        self._arm_head_timer()
        self.waiting[self] = None
        if len(self.connections) > self.cap:
            self._make_room()

    def _make_room(self) -> None:
        """Close the connection that has waited longest for a request, or refuse this one."""
        for other in self.waiting:
            if other is not self:
                del self.waiting[other]
                other.transport.close()  # it sent nothing since it came, or since its last answer
                return
        self.waiting.pop(self, None)
        self._send_and_close(503, f"the server holds {self.cap} connections, each in the middle of a request")

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
        self.waiting.pop(self, None)
        self._disarm_head_timer()
        self._in_head = False
        self._head_received = 0
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.waiting[self] = None  # kept alive: idle until its next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.pop(self, None)
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
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}[status]
        body = why.encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n"
        retry = b"retry-after: 1\r\n" if status == 503 else b""
        self.transport.write(head % (status, reason, len(body)) + retry + b"\r\n" + body)
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
