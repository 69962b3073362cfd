"""Which workers are alive, in what state, and which models they serve: the view one gateway keeps
(``redis.py`` shares it between replicas).

A worker is who it says it is only with the session secret it registered with: every later call
must carry it, so no other holder of a worker token can answer, give back or leave in its name.
A model's card (dimensions, context) is pinned by its serving workers: a worker claiming a model
that another checkpoint serves, or with another card, is refused.

A worker is alive while it heart-beats (any worker call counts) within ``worker_ttl_s``; when it
stops, or says it is gone, ``on_departed`` is called at once, so that the queue puts its jobs
back in line. A worker that is stopping is *draining*: it gets no more jobs but keeps those it
holds, to answer or give back. A worker sits out (no leases, no model) for ``stuck_s`` when it is
*stuck* (it let a lease expire; answering anything ends it) or *faulty* (its answers were refused
in ``FAULTY_AFTER`` posts in a row). A model is listed while at least one serving worker has it;
a model that was served once but has no serving worker left answers 503, not 404: it may come back.
What departed workers named is forgotten in time, so registrations cost nothing once they are
gone: a model no live worker has named for ``model_ttl_s`` answers 404 again, and the console
lists at most ``GONE_KEPT`` departed workers, for at most ``GONE_KEPT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from contract.messages import ModelCard, WorkerHello
from gateway import memory
from gateway.errors import Conflict, Forbidden, InvalidRequest, ModelNotFound, NoLiveWorker
from gateway.loops import Loops

log = logging.getLogger(__name__)
Departed = Callable[[str], Awaitable[None]]
State = Literal["serving", "draining", "stuck", "faulty"]
FAULTY_AFTER = 3  # posts in a row with refused answers
GONE_KEPT_S = 600.0  # how long the console still lists a departed worker
GONE_KEPT = 100  # ... and how many of them, newest first


class UnknownWorker(Exception):
    """A worker call from a worker that is not registered (or was dropped)."""


@dataclass
class _Worker:
    hello: WorkerHello
    session: str  # the SHA-256 of the secret it registered with
    last_seen: float
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # set when it drains or leaves
    own: bool = True  # its last heartbeat came to this replica (it counts in this replica's metrics)
    draining: bool = False
    out_until: float = 0.0  # monotonic: sitting out until then
    out_why: State = "serving"  # stuck or faulty, while out_until is ahead
    refused_posts: int = 0  # posts in a row with refused answers
    heartbeat_at: float = field(default_factory=time.time)  # wall clock: its last heartbeat, to any replica

    def state(self, now: float) -> State:
        if self.draining:
            return "draining"
        return self.out_why if self.out_until > now else "serving"


@dataclass(frozen=True)
class WorkerView:
    """A worker as the console lists it."""

    hello: WorkerHello
    state: State | Literal["gone"]
    heartbeat_at: float  # wall clock


@dataclass(frozen=True)
class _GoneView:
    """A departed worker, for the console: its hello kept as one JSON string, not as the many
    small objects of a parsed one, which would be strewn over the allocator's arenas and keep
    them all from being given back once the rest of what it named is forgotten."""

    hello: bytes
    heartbeat_at: float

    def view(self) -> WorkerView:
        return WorkerView(WorkerHello.model_validate_json(self.hello), "gone", self.heartbeat_at)


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
    def __init__(
        self, worker_ttl_s: float, stuck_s: float, model_ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic
    ):
        self._ttl_s = worker_ttl_s
        self._stuck_s = stuck_s
        self._model_ttl_s = model_ttl_s
        self._clock = clock
        self._workers: dict[str, _Worker] = {}
        self._ever_served: dict[str, set[frozenset[str]]] = {}  # model -> tag sets it was served with
        self._first_seen: dict[str, float] = {}
        self._named_by: dict[str, set[str]] = {}  # model -> the live workers that name it
        self._last_named: dict[str, float] = {}  # model named by no live worker -> since when (monotonic)
        self._departed: list[str] = []  # dropped for silence, not yet told to on_departed
        self._gone: dict[str, _GoneView] = {}  # departed lately, for the console
        self._sweeper: asyncio.Task | None = None
        self.on_departed: Departed = _nobody  # set by the app: the queue's release_worker

    async def start(self, loops: Loops | None = None) -> None:
        self._sweeper = (loops or Loops()).keep("registry sweep", self._sweep_forever)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    # -- who a worker is -----------------------------------------------------------------------

    async def heartbeat(self, hello: WorkerHello, session: str) -> None:
        self.check_claims(hello, session)
        self._remember(hello, session)

    def check_claims(self, hello: WorkerHello, session: str) -> None:
        """Refuse a heartbeat under another worker's id, or for a model another checkpoint serves
        or that is served with another card."""
        live = self._live()
        known = live.get(hello.worker_id)
        if known is not None and known.session != session:
            raise Forbidden(f"worker id {hello.worker_id!r} is registered by another worker process", code="worker_session")
        for model, card in hello.models.items():
            for other_id in self._named_by.get(model, ()):
                if other_id == hello.worker_id:
                    continue
                other = live[other_id]
                theirs = other.hello.models[model]
                same_card = (theirs.dimensions, theirs.max_input_tokens) == (card.dimensions, card.max_input_tokens)
                if other.hello.checkpoint_name != hello.checkpoint_name or not same_card:
                    log.warning(
                        "refused worker %s: it claims model %s (checkpoint %s, %d dimensions) that worker %s serves "
                        "(checkpoint %s, %d dimensions)",
                        hello.worker_id,
                        model,
                        hello.checkpoint_name,
                        card.dimensions,
                        other.hello.worker_id,
                        other.hello.checkpoint_name,
                        theirs.dimensions,
                    )
                    raise Conflict(
                        f"model {model!r} is served by checkpoint {other.hello.checkpoint_name!r} with {theirs.dimensions} "
                        f"dimensions and {theirs.max_input_tokens} tokens; this worker (checkpoint {hello.checkpoint_name!r}, "
                        f"{card.dimensions} dimensions, {card.max_input_tokens} tokens) cannot serve it too: "
                        "give it another model name",
                        code="model_conflict",
                    )

    def _remember(self, hello: WorkerHello, session: str, own: bool = True, heartbeat_at: float | None = None) -> None:
        known = self._workers.get(hello.worker_id)
        if known is None:
            known = self._workers[hello.worker_id] = _Worker(hello, session, self._clock(), own=own)
        else:
            self._unname(known.hello.worker_id, set(known.hello.models) - set(hello.models))
            known.hello, known.last_seen, known.own = hello, self._clock(), own
        known.heartbeat_at = heartbeat_at or time.time()
        self._gone.pop(hello.worker_id, None)
        for model in hello.models:
            self._ever_served.setdefault(model, set()).add(frozenset(hello.tags))
            self._first_seen.setdefault(model, time.time())
            self._named_by.setdefault(model, set()).add(hello.worker_id)
            self._last_named.pop(model, None)

    def _unname(self, worker_id: str, models: Iterable[str]) -> None:
        """``worker_id`` no longer names ``models``: those left with no live worker start to age."""
        for model in models:
            named_by = self._named_by.get(model)
            if named_by is not None:
                named_by.discard(worker_id)
                if not named_by:
                    del self._named_by[model]
                    self._last_named[model] = self._clock()

    async def touch(self, worker_id: str, session: str) -> WorkerHello:
        """Mark a worker alive and return what it registered; UnknownWorker if it is not, and 403
        if the caller is not the worker that registered it."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        if worker.session != session:
            raise Forbidden(f"worker {worker_id!r} is registered by another worker process", code="worker_session")
        worker.last_seen = self._clock()
        return worker.hello

    # -- its state -------------------------------------------------------------------------------

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
            self._unname(worker_id, worker.hello.models)
            self._gone[worker_id] = _GoneView(worker.hello.model_dump_json().encode(), worker.heartbeat_at)
            if len(self._gone) > GONE_KEPT:
                del self._gone[next(iter(self._gone))]  # the longest gone

    def leaving(self, worker_id: str) -> asyncio.Event:
        """Set once the registered worker drains or leaves; UnknownWorker if it is not registered."""
        worker = self._live().get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        return worker.leaving

    async def mark_stuck(self, worker_id: str) -> None:
        """Its lease expired unanswered: out of rotation for stuck_s, or until it answers."""
        await self._sit_out(worker_id, "stuck")

    async def note_post(self, worker_id: str, refused: bool) -> None:
        """It answered: a stuck worker is moving again; one whose answers keep being refused is faulty."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.refused_posts = worker.refused_posts + 1 if refused else 0
        if worker.refused_posts >= FAULTY_AFTER:
            worker.refused_posts = 0
            await self._sit_out(worker_id, "faulty")
        elif worker.state(self._clock()) == "stuck":
            await self._back_in(worker_id)

    async def _sit_out(self, worker_id: str, why: State) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            if worker.state(self._clock()) != why:
                log.warning(
                    "worker %s is %s: no leases for it for %gs%s",
                    worker_id,
                    why,
                    self._stuck_s,
                    ", or until it answers" if why == "stuck" else "",
                )
            worker.out_until, worker.out_why = self._clock() + self._stuck_s, why

    async def _back_in(self, worker_id: str) -> None:
        worker = self._workers[worker_id]
        worker.out_until, worker.out_why = 0.0, "serving"
        log.info("worker %s answered again: back in rotation", worker_id)

    def state(self, worker_id: str) -> State:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise UnknownWorker(worker_id)
        return worker.state(self._clock())

    # -- what it serves --------------------------------------------------------------------------

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

    async def resolve(self, model: str, tags: frozenset[str] = frozenset(), visible: Callable[[str], bool] = bool) -> Route:
        """Where a request for ``model`` goes: a serving worker of it that carries all ``tags``.
        ``visible``: which models the caller may be told of, when it names an unknown one."""
        matching = [w for w in self._serving() if model in w.hello.models and tags <= set(w.hello.tags)]
        if matching:
            newest = matching[-1].hello
            return Route(model, newest.checkpoint_name, newest.models[model], len(matching), self._first_seen[model])
        served_with = self._ever_served.get(model)
        if served_with is None:
            served = ", ".join(sorted(filter(visible, self.routes()))) or "none right now"
            raise ModelNotFound(f"model {model!r} not found; served models: {served}", param="model")
        if any(tags <= seen for seen in served_with):
            raise NoLiveWorker(f"model {model!r} has no live worker right now; try again later", param="model")
        raise InvalidRequest(
            f"no worker of model {model!r} carries the tags {sorted(tags)}; "
            f"its workers carry {sorted(sorted(s) for s in served_with)}",
            param="tags",
            code="unknown_tags",
        )

    def batch_items(self, model: str) -> int:
        """The inputs one engine batch of each serving worker of ``model`` takes, summed."""
        return sum(w.hello.max_batch_items for w in self._serving() if model in w.hello.models)

    def live_checkpoints(self) -> set[str]:
        """Checkpoints with a serving worker."""
        return {w.hello.checkpoint_name for w in self._serving()}

    def knows(self, model: str) -> bool:
        """Whether any worker ever served ``model`` (alive or not)."""
        return model in self._ever_served

    def views(self) -> list[WorkerView]:
        """Every live worker, and those gone in the last GONE_KEPT_S, by id."""
        now = self._clock()
        live = [WorkerView(w.hello, w.state(now), w.heartbeat_at) for w in self._live().values()]
        cutoff = time.time() - GONE_KEPT_S
        for worker_id in [i for i, view in self._gone.items() if view.heartbeat_at < cutoff]:
            del self._gone[worker_id]
        return sorted([*live, *(gone.view() for gone in self._gone.values())], key=lambda view: view.hello.worker_id)

    def live_count(self) -> int:
        return len(self._live())

    def _serving(self) -> list[_Worker]:
        """Live workers that are neither draining nor sitting out, oldest heartbeat first."""
        now = self._clock()
        return sorted((w for w in self._live().values() if w.state(now) == "serving"), key=lambda w: w.last_seen)

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
        stale = self._stale_models()
        if stale:
            await self.forget_models(stale)

    def _stale_models(self) -> list[str]:
        """Models that no live worker has named for model_ttl_s."""
        cutoff = self._clock() - self._model_ttl_s
        return [model for model, at in self._last_named.items() if at < cutoff]

    async def forget_models(self, models: list[str]) -> None:
        log.info("forgetting %d models that no live worker has named for %gs", len(models), self._model_ttl_s)
        self._drop_models(models)

    def _drop_models(self, models: Iterable[str]) -> None:
        for model in models:
            self._drop_model(model)
        # A dict keeps the table it grew to: copied, each is as small as what it still holds.
        self._ever_served, self._first_seen = dict(self._ever_served), dict(self._first_seen)
        self._named_by, self._last_named = dict(self._named_by), dict(self._last_named)
        memory.give_back()

    def _drop_model(self, model: str) -> None:
        self._ever_served.pop(model, None)
        self._first_seen.pop(model, None)
        self._last_named.pop(model, None)
