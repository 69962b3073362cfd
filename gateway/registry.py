"""Which workers are alive and which models they serve.

A worker is alive while it heart-beats (any worker call counts) within ``worker_ttl_s``.
A model is listed while at least one live worker serves it. A model that was served once
but has no live worker left answers 503, not 404: it may come back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ModelNotFound, NoLiveWorker
from worker.protocol import ModelCard, WorkerHello


class UnknownWorker(Exception):
    """A worker call from a worker that is not registered (or was dropped)."""


@dataclass
class _Worker:
    hello: WorkerHello
    last_seen: float


@dataclass(frozen=True)
class Route:
    """Where a model's jobs go, and what the gateway knows of the model."""

    model: str
    checkpoint: str
    card: ModelCard
    workers: int


class WorkerRegistry:
    def __init__(self, worker_ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = worker_ttl_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._ever_served: set[str] = set()

    def heartbeat(self, hello: WorkerHello) -> None:
        self._workers[hello.worker_id] = _Worker(hello, self._clock())
        self._ever_served.update(hello.models)

    def touch(self, worker_id: str) -> WorkerHello:
        """Mark a worker alive and return what it registered; UnknownWorker if it is not."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        worker.last_seen = self._clock()
        return worker.hello

    def leave(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def routes(self) -> dict[str, Route]:
        """Every model with a live worker; the newest registration describes the model."""
        routes: dict[str, Route] = {}
        for worker in sorted(self._live().values(), key=lambda w: w.last_seen):
            for name, card in worker.hello.models.items():
                count = routes[name].workers + 1 if name in routes else 1
                routes[name] = Route(name, worker.hello.checkpoint_name, card, count)
        return routes

    def resolve(self, model: str) -> Route:
        route = self.routes().get(model)
        if route is not None:
            return route
        if model in self._ever_served:
            raise NoLiveWorker(f"model {model!r} has no live worker right now; try again later", param="model")
        raise ModelNotFound(f"model {model!r} does not exist", param="model")

    def live_count(self) -> int:
        return len(self._live())

    def _live(self) -> dict[str, _Worker]:
        cutoff = self._clock() - self._ttl_s
        for worker_id in [w for w, state in self._workers.items() if state.last_seen < cutoff]:
            del self._workers[worker_id]
        return self._workers
