"""An embeddings request, dialect-free: admit it, route it, split it into jobs, wait, put it together.

Requests are split into jobs of ``job_max_inputs`` so that several workers share a large
request; workers batch jobs from many requests together. A failed job fails its request
with the error translated back to the request's own input index.

Each model's queue is bounded by requests and by (estimated) tokens: beyond, a 429 with
Retry-After, so memory stays bounded under any load. A model whose workers all went away gets
``worker_wait_s`` for one to come back, for new requests and queued jobs alike, then a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from contract.messages import JobInput
from gateway.auth import Auth
from gateway.errors import ApiError, EngineFailed, GatewayTimeout, InvalidRequest, NoLiveWorker, Overloaded
from gateway.keys import ApiKey
from gateway.metrics import GatewayMetrics
from gateway.queue import JobFailed, JobFailure, JobQueue, JobSpec, QueueTimeout, QueueUnavailable
from gateway.registry import Route, WorkerRegistry
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
WORKER_POLL_S = 0.25


@dataclass
class _Load:
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: np.ndarray  # (n, dims) float32, L2-normalised rows
    prompt_tokens: int


class EmbeddingService:
    def __init__(self, settings: GatewaySettings, queue: JobQueue, workers: WorkerRegistry, metrics: GatewayMetrics):
        self._settings = settings
        self._queue = queue
        self._workers = workers
        self._metrics = metrics
        self._load: dict[str, _Load] = {}  # per queue key: admitted, not yet answered

    async def route(self, model: str, key: ApiKey | None, tags: frozenset[str] = frozenset()) -> Route:
        """Where ``model``'s jobs go for ``key`` (None: anonymous), waiting up to worker_wait_s for
        a worker that went away."""
        Auth.check_model(key, model)  # before resolving: a key out of scope learns nothing of the model
        visible = key.allows if key is not None else bool  # an unknown name lists only the key's models
        deadline = time.monotonic() + self._settings.worker_wait_s
        while True:
            try:
                return await self._workers.resolve(model, tags, visible)
            except NoLiveWorker as exc:
                if time.monotonic() >= deadline:
                    exc.headers["Retry-After"] = str(self._settings.retry_after_s)
                    raise
            await asyncio.sleep(WORKER_POLL_S)

    async def embed(
        self,
        route: Route,
        inputs: list[JobInput],
        *,
        single: bool,
        dimensions: int | None = None,
        truncate: bool | None = None,
        tags: frozenset[str] = frozenset(),
        key: ApiKey | None = None,
    ) -> Embeddings:
        """Embed ``inputs`` on ``route`` for ``key`` (None: anonymous); ``truncate=None`` means
        the model's own default."""
        model = route.model
        _check_dimensions(route, dimensions)
        truncate = route.card.truncate if truncate is None else truncate
        if not truncate:
            _check_context(route, inputs)
        size = self._settings.job_max_inputs
        specs = [
            JobSpec(model, chunk, truncate, tags, sum(map(_estimate_tokens, chunk)))
            for chunk in (inputs[i : i + size] for i in range(0, len(inputs), size))
        ]
        self._metrics.request_inputs.observe(len(inputs))
        try:
            with self._admitted(route, sum(spec.tokens for spec in specs)):
                done = await self._queue.run(route.checkpoint, specs, self._settings.request_timeout_s)
        except asyncio.CancelledError:
            self._metrics.jobs.labels("client_gone").inc(len(specs))
            raise
        except QueueTimeout:
            self._metrics.jobs.labels("timeout").inc(len(specs))
            raise GatewayTimeout(f"model {model!r} did not answer within {self._settings.request_timeout_s:g}s") from None
        except JobFailure as failure:
            self._metrics.jobs.labels(failure.failure.code).inc()
            raise _client_error(failure, size, single, self._settings.retry_after_s) from None
        tokens = sum(sum(d.prompt_tokens) for d in done)
        self._count_served(model, key, jobs=len(specs), inputs=len(inputs), tokens=tokens)
        vectors = done[0].vectors if len(done) == 1 else np.concatenate([d.vectors for d in done])
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = l2_normalize(vectors[:, :dimensions])  # Matryoshka: a prefix is an embedding
        return Embeddings(model, vectors, tokens)

    def _count_served(self, model: str, key: ApiKey | None, *, jobs: int, inputs: int, tokens: int) -> None:
        metrics = self._metrics
        metrics.child(metrics.jobs, "ok").inc(jobs)
        metrics.child(metrics.inputs, model).inc(inputs)
        metrics.child(metrics.tokens, model).inc(tokens)
        if key is not None:
            metrics.child(metrics.key_requests, key.name).inc()
            metrics.child(metrics.key_tokens, key.name).inc(tokens)

    @contextmanager
    def _admitted(self, route: Route, tokens: int) -> Iterator[None]:
        load = self._load.setdefault(route.checkpoint, _Load())
        settings = self._settings
        # A single request larger than the token bound is let in alone, or it could never run.
        if load.requests >= settings.max_queued_requests or (load.requests and load.tokens + tokens > settings.max_queued_tokens):
            self._metrics.rejected.labels(route.model).inc()
            raise Overloaded(
                f"model {route.model!r} is at capacity ({load.requests} requests, ~{load.tokens} tokens queued); "
                f"retry after {settings.retry_after_s}s",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        load.requests += 1
        load.tokens += tokens
        try:
            yield
        finally:
            load.requests -= 1
            load.tokens -= tokens

    async def fail_orphans_forever(self, period_s: float = 1.0) -> None:
        """Fail the queued jobs of a checkpoint that had no live worker for worker_wait_s."""
        orphaned_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(period_s)
            live, now = self._workers.live_checkpoints(), time.monotonic()
            for key, stats in self._queue.stats().items():
                if key in live or not stats.depth:
                    orphaned_since.pop(key, None)
                    continue
                since = orphaned_since.setdefault(key, now)
                if now - since >= self._settings.worker_wait_s:
                    message = f"no live worker for {key!r} came back within {self._settings.worker_wait_s:g}s"
                    try:
                        count = await self._queue.abandon(key, JobFailed("no_live_worker", message))
                    except QueueUnavailable:
                        continue  # next round
                    log.warning("failed %d queued jobs: %s", count, message)
                    orphaned_since.pop(key)


def _estimate_tokens(item: JobInput) -> int:
    return len(item) // 4 + 2 if isinstance(item, str) else len(item)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _check_context(route: Route, inputs: list[JobInput]) -> None:
    """Token-id inputs longer than the model takes are refused here, before any job is built (texts
    are counted by the worker, which holds the tokenizer)."""
    limit = route.card.max_input_tokens
    for i, item in enumerate(inputs):
        if isinstance(item, list) and len(item) > limit:
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            raise InvalidRequest(
                f"'{where}' has {len(item)} tokens; model {route.model!r} accepts at most {limit} "
                "(send truncate: true to cut it)",
                param=where,
                code="context_length_exceeded",
            )


def _check_dimensions(route: Route, dimensions: int | None) -> None:
    card = route.card
    if dimensions is None or dimensions == card.dimensions or dimensions in card.matryoshka_dimensions:
        return
    if card.matryoshka_dimensions:
        allowed = ", ".join(map(str, sorted([*card.matryoshka_dimensions, card.dimensions])))
        message = f"model {route.model!r} supports 'dimensions' of {allowed} (got {dimensions})"
    else:
        message = (
            f"model {route.model!r} returns {card.dimensions}-dimensional vectors and is not a Matryoshka "
            f"model: 'dimensions' must be omitted or {card.dimensions} (got {dimensions})"
        )
    raise InvalidRequest(message, param="dimensions", code="unsupported_dimensions")


def _client_error(failure: JobFailure, job_size: int, single: bool, retry_after_s: int) -> ApiError:
    failed = failure.failure
    where = "input"
    if failed.input_index is not None and not single:
        where = f"input[{failure.job_index * job_size + failed.input_index}]"
    if failed.code == "input_too_long":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="context_length_exceeded")
    if failed.code == "invalid_input":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="invalid_value")
    if failed.code in ("attempts_exhausted", "no_live_worker"):
        return NoLiveWorker(failed.message, code=failed.code, headers={"Retry-After": str(retry_after_s)})
    return EngineFailed(f"the engine failed on '{where}'", param=where)
