"""uvicorn, with a drain on SIGTERM that loses no accepted request.

uvicorn alone would stop accepting connections at once, and so cut the workers off from the
jobs of the requests it still waits to answer. Here the first SIGTERM (or Ctrl-C) drains
instead: new client requests get 503 (``/health`` too, so readiness probes take the replica
out), workers keep leasing and posting until every client request in flight is answered (or
``request_timeout_s`` passes), then lease long-polls are woken and uvicorn shuts down. A second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger("gateway")
DRAIN_POLL_S = 0.05


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
