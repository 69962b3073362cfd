"""The gateway's ASGI app: ``create_app(settings)`` wires the pieces; state lives on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from importlib.metadata import PackageNotFoundError, version

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import ollama_api, openai_api, worker_api
from gateway.auth import Auth
from gateway.embeddings import EmbeddingService
from gateway.errors import ApiError, QueueDown, ShuttingDown
from gateway.http import ClientGone, json_response, render_error
from gateway.keys import FileKeyStore, SqliteKeyStore
from gateway.memory_queue import InMemoryQueue
from gateway.metrics import GatewayMetrics, LiveStateCollector
from gateway.openapi import openapi_document
from gateway.queue import JobQueue, QueueUnavailable
from gateway.redis_link import RedisLink
from gateway.redis_queue import RedisQueue
from gateway.redis_registry import RedisRegistry
from gateway.registry import WorkerRegistry
from gateway.settings import GatewaySettings
from worker.protocol import PREFIX

log = logging.getLogger("gateway")

# nginx's code for "client closed request": never sent (nobody is listening), only counted.
CLIENT_CLOSED = 499


async def health(request: Request) -> Response:
    state = request.app.state
    status = "draining" if state.draining else "ok"  # 503 while draining: readiness probes take us out
    body = {"status": status, "workers": state.workers.live_count(), "models": sorted(state.workers.routes())}
    return json_response(body, status=503 if state.draining else 200)


async def openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi)


def _version() -> str:
    try:
        return version("embedq")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED)


class RequestMetrics:
    """Counts and times every request by endpoint (the route path, or "other") and status;
    tracks client requests in flight, and refuses new ones while the gateway drains."""

    def __init__(self, app: ASGIApp, endpoints: set[str], metrics: GatewayMetrics):
        self._app, self._endpoints, self._metrics = app, endpoints, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(PREFIX) or scope["path"] in ("/metrics", "/health"):
            return await self._observed(scope, receive, send)
        state = scope["app"].state
        if state.draining:
            refusal = ShuttingDown(
                "the gateway is shutting down; retry on another replica",
                headers={"Retry-After": "1", "Connection": "close"},  # move this client off the replica
            )
            return await render_error(Request(scope), refusal)(scope, receive, send)
        state.in_flight += 1
        self._metrics.in_flight.inc()
        try:
            await self._observed(scope, receive, send)
        finally:
            state.in_flight -= 1
            self._metrics.in_flight.dec()

    async def _observed(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self._endpoints else "other"
        started, status = time.perf_counter(), CLIENT_CLOSED

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, send_and_see)
        finally:
            self._metrics.child(self._metrics.requests, endpoint, str(status)).inc()
            self._metrics.child(self._metrics.latency, endpoint).observe(time.perf_counter() - started)


def _key_store(settings: GatewaySettings) -> SqliteKeyStore | FileKeyStore | None:
    if settings.keys_db:
        return SqliteKeyStore(settings.keys_db)
    if settings.keys_file:
        return FileKeyStore(settings.keys_file)
    return None


def _backend(
    settings: GatewaySettings, metrics: GatewayMetrics, queue: JobQueue | None,
) -> tuple[RedisLink | None, JobQueue, WorkerRegistry]:
    """The job queue and the worker registry: in this process, or shared through Redis."""
    if settings.queue == "memory":
        queue = queue or InMemoryQueue(settings.lease_ttl_s, settings.max_attempts, on_expired=metrics.on_lease_expired)
        return None, queue, WorkerRegistry(settings.worker_ttl_s)
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    link = RedisLink(settings.redis_url, password, settings.redis_prefix)
    queue = queue or RedisQueue(link, settings.lease_ttl_s, settings.max_attempts, on_expired=metrics.on_lease_expired)
    return link, queue, RedisRegistry(link, settings.worker_ttl_s)


def _safe_url(url: str) -> str:
    """The URL without any password in it, for the log."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2] if sep else url


async def _queue_down(request: Request, exc: Exception) -> Response:
    """A shared queue's Redis is unreachable: 503 for clients and workers alike (workers retry)."""
    retry_after = str(request.app.state.settings.retry_after_s)
    return render_error(request, QueueDown(f"{exc}; retry shortly", headers={"Retry-After": retry_after}))


def create_app(settings: GatewaySettings, queue: JobQueue | None = None) -> Starlette:
    registry = CollectorRegistry()
    gateway_metrics = GatewayMetrics(registry)
    link, queue, workers = _backend(settings, gateway_metrics, queue)
    registry.register(LiveStateCollector(queue, workers))

    keys = _key_store(settings)
    embeddings = EmbeddingService(settings, queue, workers, gateway_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if settings.workers_open:
            log.warning("no worker token configured: any worker that can reach %s:%d is accepted", settings.host, settings.port)
        if keys is None:
            log.warning("no API keys configured: any client that can reach %s:%d is served", settings.host, settings.port)
        else:
            log.info("client API keys from %s", settings.keys_db or settings.keys_file)
        if link is not None:
            log.info("queue: Redis at %s (prefix %r), this replica %s", _safe_url(settings.redis_url),
                     settings.redis_prefix, link.replica)
            await link.start()
        await queue.start()
        await workers.start()
        watchdog = asyncio.create_task(embeddings.fail_orphans_forever())
        try:
            yield
        finally:
            watchdog.cancel()
            await workers.stop()
            await queue.stop()
            if link is not None:
                await link.stop()
            if isinstance(keys, SqliteKeyStore):
                keys.close()

    routes = [
        *openai_api.routes,
        *ollama_api.routes,
        *worker_api.routes,
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: render_error, HTTPException: render_error, ClientGone: _client_gone, QueueUnavailable: _queue_down,
            Exception: render_error,
        },
    )
    app.state.settings = settings
    app.state.openapi = orjson.dumps(openapi_document(_version()))
    app.state.registry = registry
    app.state.metrics = gateway_metrics
    app.state.queue = queue
    app.state.workers = workers
    app.state.auth = Auth(settings, keys)
    app.state.embeddings = embeddings
    app.state.draining = False  # set by the server on SIGTERM (server.py)
    app.state.in_flight = 0
    app.add_middleware(RequestMetrics, endpoints={r.path for r in routes}, metrics=gateway_metrics)
    return app
