"""Which workers are alive, which are stuck, and which models they serve: the view one gateway
keeps (``redis.py`` shares it between replicas).

A worker is alive while it heart-beats (any worker call counts) within ``worker_ttl_s``; when it
stops, or says it is gone, ``on_departed`` is called at once, so that the queue puts its jobs
back in line. A worker that is stopping is *draining*: it gets no more jobs but keeps those it
holds, to answer or give back. A worker whose lease expired unanswered is *stuck* for
``stuck_s`` (or until it posts anything): it gets no leases meanwhile. Neither serves a model.
A model is listed while at least one serving worker has it; a model that was served once but has
no serving worker left answers 503, not 404: it may come back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from contract.messages import ModelCard, WorkerHello
from gateway.errors import InvalidRequest, ModelNotFound, NoLiveWorker

log = logging.getLogger(__name__)
Departed = Callable[[str], Awaitable[None]]


class UnknownWorker(Exception):
    """A worker call from a worker that is not registered (or was dropped)."""


@dataclass
class _Worker:
    hello: WorkerHello
    last_seen: float
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # set when it leaves
    own: bool = True  # its last heartbeat came to this replica (it counts in this replica's metrics)
    stuck_until: float = 0.0  # monotonic
    draining: bool = False


@dataclass(frozen=True)
class Route:
    """Where a model's jobs go, and what the gateway knows of the model."""

    model: str
    checkpoint: str
    card: ModelCard
    workers: int
    registered_at: float  # wall-clock time the gateway first saw the model


async def _nobody(worker_id: str) -> None:
    return None


class WorkerRegistry:
    def __init__(self, worker_ttl_s: float, stuck_s: float, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = worker_ttl_s
        self._stuck_s = stuck_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._ever_served: dict[str, set[frozenset[str]]] = {}  # model -> tag sets it was served with
        self._first_seen: dict[str, float] = {}
        self._departed: list[str] = []  # dropped for silence, not yet told to on_departed
        self._sweeper: asyncio.Task | None = None
        self.on_departed: Departed = _nobody  # set by the app: the queue's release_worker

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

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

    async def drain(self, worker_id: str) -> None:
        """It is stopping: no more jobs for it (its pending long-poll ends now)."""
        self._draining(worker_id)

    def _draining(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.draining = True
            worker.leaving.set()

    async def leave(self, worker_id: str) -> None:
        """It is gone: whatever it still holds goes back in line."""
        self._forget(worker_id)
        await self.on_departed(worker_id)

    def _forget(self, worker_id: str) -> None:
        worker = self._workers.pop(worker_id, None)
        if worker is not None:
            worker.leaving.set()  # its pending lease calls return at once

    def leaving(self, worker_id: str) -> asyncio.Event:
        """Set once the registered worker drains or leaves; UnknownWorker if it is not registered."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        return worker.leaving

    async def mark_stuck(self, worker_id: str) -> None:
        """Its lease expired unanswered: out of rotation for stuck_s, or until it posts."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            if not self.is_stuck(worker_id):
                log.warning(
                    "worker %s let a lease expire: no leases for it for %gs, or until it answers", worker_id, self._stuck_s
                )
            worker.stuck_until = self._clock() + self._stuck_s

    async def mark_serving(self, worker_id: str) -> None:
        """It answered: back in rotation (a no-op unless it was stuck)."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.stuck_until:
            worker.stuck_until = 0.0
            log.info("worker %s answered again: back in rotation", worker_id)

    def is_stuck(self, worker_id: str) -> bool:
        worker = self._workers.get(worker_id)
        return worker is not None and worker.stuck_until > self._clock()

    def routes(self, own_only: bool = False) -> dict[str, Route]:
        """Every model with a serving worker; the newest registration describes the model.
        own_only: count only the workers whose last heartbeat came to this replica."""
        routes: dict[str, Route] = {}
        for worker in self._serving():
            if own_only and not worker.own:
                continue
            for name, card in worker.hello.models.items():
                count = routes[name].workers + 1 if name in routes else 1
                routes[name] = Route(name, worker.hello.checkpoint_name, card, count, self._first_seen[name])
        return routes

    async def resolve(self, model: str, tags: frozenset[str] = frozenset()) -> Route:
        """Where a request for ``model`` goes: a serving worker of it that carries all ``tags``."""
        matching = [w for w in self._serving() if model in w.hello.models and tags <= set(w.hello.tags)]
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
            param="tags",
            code="unknown_tags",
        )

    def live_checkpoints(self) -> set[str]:
        """Checkpoints with a serving worker."""
        return {w.hello.checkpoint_name for w in self._serving()}

    def knows(self, model: str) -> bool:
        """Whether any worker ever served ``model`` (alive or not)."""
        return model in self._ever_served

    def live_count(self) -> int:
        return len(self._live())

    def _serving(self) -> list[_Worker]:
        """Live workers that are neither stuck nor draining, oldest heartbeat first."""
        now = self._clock()
        serving = (w for w in self._live().values() if w.stuck_until <= now and not w.draining)
        return sorted(serving, key=lambda w: w.last_seen)

    def _live(self) -> dict[str, _Worker]:
        cutoff = self._clock() - self._ttl_s
        for worker_id in [w for w, state in self._workers.items() if state.last_seen < cutoff]:
            log.warning("worker %s is gone: no heartbeat for %gs", worker_id, self._ttl_s)
            self._forget(worker_id)
            self._departed.append(worker_id)
        return self._workers

    async def _sweep_forever(self) -> None:
        """Notice silent workers without waiting for a request to look, and tell on_departed."""
        while True:
            await asyncio.sleep(min(0.5, self._ttl_s / 4))
            await self.sweep()

    async def sweep(self) -> None:
        self._live()
        while self._departed:
            await self.on_departed(self._departed.pop(0))
