"""The ASGI layer around every route: counting, timing, draining, and the last line of defence.

``RequestMetrics`` counts and times every request by endpoint (the route path, or "other") and
the status the client got; tracks client requests in flight; refuses new ones while the gateway
drains; and turns an exception nothing else handled into a generic 500 (logged once, with its
traceback; the client sees no internal text). It sits inside Starlette's own error middleware,
so that a 500 is counted as the 500 it is, not as a client that left.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.messages import PREFIX
from gateway.errors import ApiError, ShuttingDown
from gateway.http import error_response
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway")

# nginx's code for "client closed request": never sent (nobody is listening), only counted.
CLIENT_CLOSED = 499


class RequestMetrics:
    def __init__(self, app: ASGIApp, endpoints: set[str], metrics: GatewayMetrics):
        self._app, self._endpoints, self._metrics = app, endpoints, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        if scope["path"].startswith(PREFIX) or scope["path"] in ("/metrics", "/health"):
            return await self._observed(scope, receive, send)
        state = scope["app"].state
        if state.draining:
            refusal = ShuttingDown(
                "the gateway is shutting down; retry on another replica",
                # Connection: close moves this client off the replica.
                headers={"Retry-After": str(state.settings.retry_after_s), "Connection": "close"},
            )
            return await error_response(scope["path"], refusal)(scope, receive, send)
        state.in_flight += 1
        self._metrics.in_flight.inc()
        try:
            await self._observed(scope, receive, send)
        finally:
            state.in_flight -= 1
            self._metrics.in_flight.dec()

    async def _observed(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["path"] if scope["path"] in self._endpoints else "other"
        started, status = time.perf_counter(), CLIENT_CLOSED

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_and_see)
        except Exception as exc:  # nothing handled it: a bug of ours, never the client's business
            log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if status == CLIENT_CLOSED:  # nothing sent yet: answer it
                response = error_response(scope["path"], ApiError("internal error; the gateway logged the details"))
                await response(scope, receive, send_and_see)
        finally:
            self._metrics.child(self._metrics.requests, endpoint, str(status)).inc()
            self._metrics.child(self._metrics.latency, endpoint).observe(time.perf_counter() - started)
