"""An embeddings request, dialect-free: route it, split it into jobs, wait, put it together.

Requests are split into jobs of ``job_max_inputs`` so that several workers share a large
request; workers batch jobs from many requests together. A failed job fails its request
with the error translated back to the request's own input index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.auth import Auth
from gateway.errors import ApiError, EngineFailed, GatewayTimeout, InvalidRequest, NoLiveWorker
from gateway.keys import ApiKey
from gateway.metrics import GatewayMetrics
from gateway.queue import JobFailure, JobQueue, JobSpec, QueueTimeout
from gateway.registry import Route, WorkerRegistry
from gateway.settings import GatewaySettings
from worker.protocol import JobInput


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

    async def embed(
        self, model: str, inputs: list[JobInput], *, single: bool, dimensions: int | None = None,
        truncate: bool | None = None, tags: frozenset[str] = frozenset(), key: ApiKey | None = None,
    ) -> Embeddings:
        """Embed ``inputs`` with ``model`` for ``key`` (None: anonymous); ``truncate=None`` means
        the model's own default."""
        Auth.check_model(key, model)  # before resolving: a key out of scope learns nothing of the model
        route = self._workers.resolve(model, tags)
        _check_dimensions(route, dimensions)
        truncate = route.card.truncate if truncate is None else truncate
        size = self._settings.job_max_inputs
        specs = [JobSpec(model, inputs[i : i + size], truncate, tags) for i in range(0, len(inputs), size)]
        self._metrics.request_inputs.observe(len(inputs))
        try:
            done = await self._queue.run(route.checkpoint, specs, self._settings.request_timeout_s)
        except QueueTimeout:
            self._metrics.jobs.labels("timeout").inc(len(specs))
            raise GatewayTimeout(
                f"model {model!r} did not answer within {self._settings.request_timeout_s:g}s"
            ) from None
        except JobFailure as failure:
            self._metrics.jobs.labels(failure.failure.code).inc()
            raise _client_error(failure, size, single) from None
        self._metrics.jobs.labels("ok").inc(len(specs))
        tokens = sum(sum(d.prompt_tokens) for d in done)
        self._metrics.inputs.labels(model).inc(len(inputs))
        self._metrics.tokens.labels(model).inc(tokens)
        if key is not None:
            self._metrics.key_requests.labels(key.name).inc()
            self._metrics.key_tokens.labels(key.name).inc(tokens)
        vectors = done[0].vectors if len(done) == 1 else np.concatenate([d.vectors for d in done])
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = l2_normalize(vectors[:, :dimensions])  # Matryoshka: a prefix is an embedding
        return Embeddings(model, vectors, tokens)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def _check_dimensions(route: Route, dimensions: int | None) -> None:
    card = route.card
    if dimensions is None or dimensions == card.dimensions or dimensions in card.matryoshka_dimensions:
        return
    if card.matryoshka_dimensions:
        allowed = ", ".join(map(str, sorted([*card.matryoshka_dimensions, card.dimensions])))
        message = f"model {route.model!r} supports 'dimensions' of {allowed} (got {dimensions})"
    else:
        message = (f"model {route.model!r} returns {card.dimensions}-dimensional vectors and is not a Matryoshka "
                   f"model: 'dimensions' must be omitted or {card.dimensions} (got {dimensions})")
    raise InvalidRequest(message, param="dimensions", code="unsupported_dimensions")


def _client_error(failure: JobFailure, job_size: int, single: bool) -> ApiError:
    failed = failure.failure
    where = "input"
    if failed.input_index is not None and not single:
        where = f"input[{failure.job_index * job_size + failed.input_index}]"
    if failed.code == "input_too_long":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="context_length_exceeded")
    if failed.code == "invalid_input":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="invalid_value")
    if failed.code == "attempts_exhausted":
        return NoLiveWorker(failed.message, code="attempts_exhausted")
    return EngineFailed(f"the engine failed on '{where}'", param=where)
