"""Which workers are alive and which models they serve.

A worker is alive while it heart-beats (any worker call counts) within ``worker_ttl_s``.
A model is listed while at least one live worker serves it. A model that was served once
but has no live worker left answers 503, not 404: it may come back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import InvalidRequest, ModelNotFound, NoLiveWorker
from worker.protocol import ModelCard, WorkerHello


class UnknownWorker(Exception):
    """A worker call from a worker that is not registered (or was dropped)."""


@dataclass
class _Worker:
    hello: WorkerHello
    last_seen: float
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # set when it leaves
    own: bool = True  # its last heartbeat came to this replica (it counts in this replica's metrics)


@dataclass(frozen=True)
class Route:
    """Where a model's jobs go, and what the gateway knows of the model."""

    model: str
    checkpoint: str
    card: ModelCard
    workers: int
    registered_at: float  # wall-clock time the gateway first saw the model


class WorkerRegistry:
    def __init__(self, worker_ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = worker_ttl_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._ever_served: dict[str, set[frozenset[str]]] = {}  # model -> tag sets it was served with
        self._first_seen: dict[str, float] = {}

    async def start(self) -> None:
        """Start background work (none here; see redis_registry.py)."""

    async def stop(self) -> None: ...

    async def heartbeat(self, hello: WorkerHello) -> None:
        self._remember(hello)

    def _remember(self, hello: WorkerHello, own: bool = True) -> None:
        known = self._workers.get(hello.worker_id)
        if known is None:
            self._workers[hello.worker_id] = _Worker(hello, self._clock(), own=own)
        else:
            known.hello, known.last_seen, known.own = hello, self._clock(), own
        for model in hello.models:
            self._ever_served.setdefault(model, set()).add(frozenset(hello.tags))
            self._first_seen.setdefault(model, time.time())

    async def touch(self, worker_id: str) -> WorkerHello:
        """Mark a worker alive and return what it registered; UnknownWorker if it is not."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        worker.last_seen = self._clock()
        return worker.hello

    async def leave(self, worker_id: str) -> None:
        self._forget(worker_id)

    def _forget(self, worker_id: str) -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            worker.leaving.set()  # its pending lease calls return at once

    def leaving(self, worker_id: str) -> asyncio.Event:
        """Set once the registered worker leaves; UnknownWorker if it is not registered."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        return worker.leaving

    def routes(self, own_only: bool = False) -> dict[str, Route]:
        """Every model with a live worker; the newest registration describes the model.
        own_only: count only the workers whose last heartbeat came to this replica."""
        routes: dict[str, Route] = {}
        for worker in sorted(self._live().values(), key=lambda w: w.last_seen):
            if own_only and not worker.own:
                continue
            for name, card in worker.hello.models.items():
                count = routes[name].workers + 1 if name in routes else 1
                routes[name] = Route(name, worker.hello.checkpoint_name, card, count, self._first_seen[name])
        return routes

    async def resolve(self, model: str, tags: frozenset[str] = frozenset()) -> Route:
        """Where a request for ``model`` goes: a live worker serving it that carries all ``tags``."""
        matching = [
            w for w in sorted(self._live().values(), key=lambda w: w.last_seen)
            if model in w.hello.models and tags <= set(w.hello.tags)
        ]
        if matching:
            newest = matching[-1].hello
            return Route(model, newest.checkpoint_name, newest.models[model], len(matching), self._first_seen[model])
        served_with = self._ever_served.get(model)
        if served_with is None:
            served = ", ".join(sorted(self.routes())) or "none right now"
            raise ModelNotFound(f"model {model!r} not found; served models: {served}", param="model")
        if any(tags <= seen for seen in served_with):
            raise NoLiveWorker(f"model {model!r} has no live worker right now; try again later", param="model")
        raise InvalidRequest(
            f"no worker of model {model!r} carries the tags {sorted(tags)}; "
            f"its workers carry {sorted(sorted(s) for s in served_with)}",
            param="tags", code="unknown_tags",
        )

    def live_checkpoints(self) -> set[str]:
        return {w.hello.checkpoint_name for w in self._live().values()}

    def knows(self, model: str) -> bool:
        """Whether any worker ever served ``model`` (alive or not)."""
        return model in self._ever_served

    def live_count(self) -> int:
        return len(self._live())

    def _live(self) -> dict[str, _Worker]:
        cutoff = self._clock() - self._ttl_s
        for worker_id in [w for w, state in self._workers.items() if state.last_seen < cutoff]:
            del self._workers[worker_id]
        return self._workers
