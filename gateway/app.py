"""The gateway's ASGI app: ``create_app(settings)`` wires the pieces; state lives on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contract import software_version
from gateway import console, worker_endpoints
from gateway.activity import Activity
from gateway.auth import Auth
from gateway.batches import api as batches_api
from gateway.batches.retention import Retention
from gateway.batches.runner import BatchRunner
from gateway.batches.store import BatchStore, DirStore
from gateway.batches.store import RedisStore as RedisBatchStore
from gateway.console import Sessions
from gateway.dialects import cohere, ollama, openai, tei, vllm
from gateway.errors import ApiError
from gateway.guard import BrowserGuard
from gateway.http import BodyBytes, ClientGone, error_response, json_response, render_error
from gateway.loops import Loops
from gateway.metrics import GatewayMetrics, LiveStateCollector
from gateway.middleware import CLIENT_CLOSED, RequestMetrics
from gateway.openapi import openapi_document
from gateway.queue import JobQueue, MemoryStore, QueueUnavailable, Reason, Reclaimed, RedisStore
from gateway.queue.store import Store
from gateway.redis_link import RedisLink, safe_url, unreachable
from gateway.registry import RedisRegistry, WorkerRegistry
from gateway.service import Service
from gateway.settings import GatewaySettings
from gateway.tenancy import admin
from gateway.tenancy.calls import CallLedger
from gateway.tenancy.keys import FileKeyStore, KeyStore, RedisKeyStore, SqliteKeyStore
from gateway.tenancy.limits import Limiter, MemoryLimiter, RedisLimiter
from gateway.tenancy.usage import MemoryUsage, RedisUsage, SqliteUsage, UsageLedger

log = logging.getLogger("gateway")


async def health(request: Request) -> Response:
    """503 while draining (readiness probes take us out) or while a background loop waits to
    start again after a failure (``loops.py``), naming it."""
    state = request.app.state
    down = state.loops.down()
    status = "draining" if state.draining else "degraded" if down else "ok"
    body = {"status": status, "workers": state.workers.live_count(), "models": sorted(state.workers.routes())}
    if down:
        body["loops_down"] = down
    return json_response(body, status=200 if status == "ok" else 503)


async def openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def metrics(request: Request) -> Response:
    request.app.state.auth.metrics(request)
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _redis_down(request: Request, exc: Exception) -> Response:
    """Redis is unreachable, for whatever a route asked of it (the queue, keys, limits, usage,
    files, batches): 503 for clients and workers alike (workers retry)."""
    return error_response(request.url.path, unreachable(exc, request.app.state.settings.retry_after_s))


def _key_store(settings: GatewaySettings) -> KeyStore | None:
    if settings.keys_db:
        return SqliteKeyStore(settings.keys_db)
    if settings.keys_file:
        return FileKeyStore(settings.keys_file)
    if settings.keys_redis:
        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        return RedisKeyStore(settings.redis_url, password, settings.redis_prefix)
    return None


def _tenancy(settings: GatewaySettings, link: RedisLink | None) -> tuple[Limiter, UsageLedger]:
    """Where limits count and usage is kept: in Redis with replicas; else in this process, and
    usage in the key database's file when there is one (budgets then outlive a restart: the
    limiter reads what was spent from it)."""
    lapse_s = settings.request_timeout_s + 10  # a concurrency slot a crashed replica never freed
    if link is not None:
        usage = UsageLedger(RedisUsage(link, settings.usage_retention_days * 86400), settings.usage_retention_days)
        return RedisLimiter(link, lapse_s), usage
    usage = UsageLedger(SqliteUsage(settings.keys_db) if settings.keys_db else MemoryUsage(), settings.usage_retention_days)
    return MemoryLimiter(lapse_s, spent=usage.spent), usage


def _backend(settings: GatewaySettings) -> tuple[RedisLink | None, Store, WorkerRegistry]:
    """Where jobs and worker registrations live: in this process, or shared through Redis. A
    stuck worker sits out as long as the longest lease."""
    if settings.queue == "memory":
        return None, MemoryStore(), WorkerRegistry(settings.worker_ttl_s, settings.lease_ttl_s, settings.model_ttl_s)
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    link = RedisLink(settings.redis_url, password, settings.redis_prefix)
    return link, RedisStore(link), RedisRegistry(link, settings.worker_ttl_s, settings.lease_ttl_s, settings.model_ttl_s)


def create_app(settings: GatewaySettings) -> Starlette:
    registry = CollectorRegistry()
    gateway_metrics = GatewayMetrics(registry)
    link, store, workers = _backend(settings)

    async def reclaimed(reason: Reason, what: Reclaimed) -> None:
        gateway_metrics.on_reclaimed(reason, what)
        for worker_id in what.workers:  # whose leases expired unanswered: out of rotation a while
            await workers.mark_stuck(worker_id)

    queue = JobQueue(
        store,
        lease_ttl_s=settings.lease_ttl_s,
        max_attempts=settings.max_attempts,
        objectives=settings.objectives,
        on_reclaimed=reclaimed,
    )

    async def departed(worker_id: str) -> None:
        await queue.release_worker(worker_id)  # leases follow their worker
        gateway_metrics.forget_worker(worker_id)

    workers.on_departed = departed
    registry.register(LiveStateCollector(queue, workers))
    keys = _key_store(settings)
    limiter, usage = _tenancy(settings, link)
    activity = Activity(link, queue.stats)
    # Files and batches: in the queue's Redis with replicas (every replica reads them), else in the data directory.
    batches: BatchStore = RedisBatchStore(link) if link is not None else DirStore(settings.data_dir)
    service = Service(settings, queue, workers, gateway_metrics, limiter, kept=batches)
    runner = BatchRunner(batches, service, workers, keys, usage, activity, gateway_metrics, settings,
                         holder=link.replica if link is not None else "local")  # fmt: skip
    retention = Retention(batches, settings.file_retention_s)

    loops = Loops(on_restart=lambda name: gateway_metrics.loop_restarts.labels(name).inc())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.workers_open:
            log.warning("no worker token configured: any worker that can reach %s:%d is accepted", settings.host, settings.port)
        if keys is None:
            log.warning("no API keys configured: any client that can reach %s:%d is served", settings.host, settings.port)
        else:
            log.info("client API keys from %s", settings.keys_db or settings.keys_file)
        if link is not None:
            log.info(
                "queue: Redis at %s (prefix %r), this replica %s",
                safe_url(settings.redis_url),
                settings.redis_prefix,
                link.replica,
            )
            await link.start(loops)
        await batches.start()
        if link is None:
            log.info("files and batches in %s", settings.data_dir)
        background: list[asyncio.Task] = []
        await queue.start(loops)
        await workers.start(loops)
        for name, forever in [("orphaned jobs", service.fail_orphans_forever), ("usage", usage.run), ("batches", runner.run),
                              ("file retention", retention.run), ("activity", activity.run),
                              *([("keys", keys.run)] if keys is not None else [])]:  # fmt: skip
            background.append(loops.keep(name, forever))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await runner.stop()
            await usage.flush()
            await workers.stop()
            await queue.stop()
            await batches.stop()
            if link is not None:
                await link.stop()
            if keys is not None:
                await keys.stop()
            await loops.stop()

    routes = [
        *openai.routes,
        *ollama.routes,
        *vllm.routes,
        *cohere.routes,
        *tei.routes,
        *worker_endpoints.routes,
        *batches_api.routes,
        *admin.routes,
        *(console.routes if settings.ui else []),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: render_error,
            HTTPException: render_error,
            ClientGone: _client_gone,
            QueueUnavailable: _redis_down,
            RedisError: _redis_down,
        },
    )
    app.state.settings = settings
    app.state.loops = loops
    app.state.bodies = BodyBytes(settings.max_body_bytes_in_flight)
    app.state.openapi = orjson.dumps(openapi_document(software_version()))
    app.state.registry = registry
    app.state.metrics = gateway_metrics
    app.state.queue = queue
    app.state.workers = workers
    app.state.auth = Auth(settings, keys)
    app.state.service = service
    app.state.keys = keys
    app.state.usage = usage
    app.state.batches = batches
    app.state.batch_runner = runner
    app.state.batch_retention = retention
    app.state.activity = activity
    app.state.sessions = Sessions(link)
    app.state.draining = False  # set by the server on SIGTERM (server.py)
    app.state.in_flight = 0
    app.router.redirect_slashes = False  # Starlette's would send the client to the Host it named (http.render_error)
    app.add_middleware(CallLedger, usage=usage, activity=activity)
    app.add_middleware(BrowserGuard, settings=settings)
    app.add_middleware(RequestMetrics, endpoints={r.path for r in routes}, metrics=gateway_metrics)  # outermost: counts all
    return app
