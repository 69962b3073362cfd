"""The job queue: one core for every backend. A store (``memory.py``, ``redis.py``) keeps the
jobs and the leases; everything else is here, once.

Client side, ``run`` queues a request's jobs and waits for all of them, in order; however it
ends (answered, failed, timed out, or cancelled because the client left) none of its jobs stays
queued. Worker side, ``lease`` hands out batches (the fill window below), ``answer`` and
``release`` take them back, ``release_worker`` returns a departed worker's leases at once, and
an upkeep loop expires leases that outlived what their worker asked for.

Answers are checked before any client sees them (``answer``): every value finite, token counts
within the model's context, a row per input of the job's width (the model's size for vectors, one
for scores; token ids for a tokenize job, texts for a detokenize one), an error index within the
job. An answer that fails is refused, and its job goes back in line for another worker.

Lease length: a worker says how long it needs (``hold_s``, from its engine's measured pace);
the core bounds that by ``lease_ttl_s`` (and uses the bound for a worker that has not measured
yet). So a worker that hangs loses its jobs to another worker after about one batch time, not
after a fixed minute; one that dies loses them when the registry drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.messages import Job
from gateway.loops import Loops
from gateway.queue.jobs import (
    CLASSES,
    Answer,
    JobDone,
    JobFailed,
    JobSpec,
    Outcome,
    Pending,
    Placement,
    QueueStats,
    QueueTimeout,
    QueueUnavailable,
    all_answered,
)
from gateway.queue.store import Ask, Budgets, Reason, Reclaimed, Store, Verdict

log = logging.getLogger(__name__)
ANYONE = Placement()  # the default class, the anonymous tenant
WAKE_POLL_S = 1.0  # a waiting lease looks again this often, should an arrival be missed
MIN_HOLD_S = 1.0  # the shortest lease, whatever a worker asks for
JUST_IN_TIME_S = 0.005  # a lease takes its jobs this long before its engine is free (the reply's way back)
# A class that had an arrival this recently bounds engine calls as if its jobs were waiting: its
# next job will likely arrive while the call runs, and it waits for the call to end.
RECENT_S = 2.0
# A call this many times the fixed part of one is full: a larger one would add under 5% to the
# engine's throughput, and make whoever arrives meanwhile wait longer. Bounds the calls of a class
# with no objective (batch), so that a job arriving after a quiet spell waits for one such call.
FULL_CALL = 20
PACE_FOR_S = 30.0  # a worker's measured pace speaks for its engine this long after a lease brought it
_REASONS: dict[Reason, str] = {
    "expired": "its last lease expired",
    "released": "its last worker gave it back",
    "departed": "its last worker went away",
    "refused": "its last worker's answer was refused",
}


@dataclass(frozen=True)
class Expect:
    """What every answer of a worker must respect, whatever its job: the model's context (None:
    the model embeds over-long inputs in chunks, so an input may count more tokens)."""

    max_tokens: int | None


@dataclass(frozen=True)
class _Engine:
    """A worker's engine as its last lease on a queue described it (``at``): its pace, and how
    many estimated tokens its calls hold when the queue is backlogged (a full call, or what its
    lease's bounds allow, in the tokens per input of the jobs it took); no tokens: no pace."""

    at: float
    call_s: float = 0.0
    token_s: float = 0.0
    call_tokens: float = 0.0

    def tokens_per_s(self) -> float | None:
        if not self.call_tokens:
            return None
        return self.call_tokens / (self.call_s + self.token_s * self.call_tokens)


@dataclass
class Settled:
    """What became of a worker's post."""

    accepted: int = 0
    stale: int = 0
    refused: dict[str, str] = field(default_factory=dict)  # job id -> what was wrong with its answer


def problem(outcome: Outcome, expect: Expect) -> str | None:
    """What is wrong with an answer on its own (its fit to the job is the store's to check)."""
    if isinstance(outcome, JobFailed):
        return None
    if not np.isfinite(outcome.vectors).all():
        return "non-finite values (NaN or infinity)"
    limit = expect.max_tokens if outcome.vectors.shape[1] > 0 else None  # a tokenizer counts beyond the context
    if any(count <= 0 or (limit is not None and count > limit) for count in outcome.prompt_tokens):
        return f"prompt_tokens outside 1..{limit}" if limit is not None else "prompt_tokens below 1"
    return None


class JobQueue:
    def __init__(
        self,
        store: Store,
        *,
        lease_ttl_s: float,
        max_attempts: int,
        objectives: tuple[float | None, ...] = (None,) * len(CLASSES),
        on_reclaimed: Callable[[Reason, Reclaimed], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.pending: dict[str, Pending] = {}
        self._objectives = objectives  # per class: the most its jobs should wait for others' engine time
        self._store = store
        self._lease_ttl_s = lease_ttl_s
        self._on_reclaimed = on_reclaimed  # metrics, and the registry's view of stuck workers
        self._clock = clock
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]
        self._inputs_arrived: dict[str, int] = {}  # per queue, inputs that arrived so far
        self._arrived: dict[str, asyncio.Event] = {}  # per queue, set (and replaced) on arrivals
        self._arrived_at: dict[str, list[float]] = {}  # per queue, when a job of each class last arrived
        self._engines: dict[str, dict[str, _Engine]] = {}  # per queue, per worker: its engine's pace
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._closing = self._stopped = False
        self._closed = asyncio.Event()  # set with _closing
        store.bind(self, max_attempts)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, loops: Loops | None = None) -> None:
        """Its loops (and its store's) kept by ``loops``: the gateway's, or ones of its own."""
        loops = loops or Loops()
        await self._store.start(loops)
        self._tasks = [loops.keep("queue upkeep", self._upkeep_forever)]

    async def stop(self) -> None:
        self._stopped = True
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self._store.stop()

    async def close_leases(self) -> None:
        """From now on lease calls return at once, empty (the gateway is about to exit)."""
        self._closing = True
        self._closed.set()
        self._wake_all()

    # -- client side -------------------------------------------------------------------------

    async def run(self, key: str, specs: list[JobSpec], timeout_s: float, placement: Placement = ANYONE) -> list[JobDone]:
        """Queue the jobs on queue ``key`` and wait for all of them, in order. Raises JobFailure
        on the first failed job and QueueTimeout after timeout_s."""
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [
            Pending(f"{self._prefix}.{next(self._ids)}", key, spec, placement, loop.create_future(), now) for spec in specs
        ]
        for entry in entries:
            self.pending[entry.job_id] = entry
        refused = False  # the store was unreachable: nothing to withdraw
        try:
            try:
                await self._store.put(entries)
            except QueueUnavailable:
                refused = True
                raise
            async with asyncio.timeout(timeout_s):
                await all_answered([entry.future for entry in entries], loop)
        except TimeoutError:
            raise QueueTimeout(f"not answered within {timeout_s:g}s") from None
        finally:
            unanswered = [entry.job_id for entry in entries if not entry.future.done()]
            for entry in entries:
                del self.pending[entry.job_id]
                entry.future.cancel()
            if unanswered and not refused:  # not awaited: this may be a cancelled request's last breath
                self._in_background(self._store.withdraw(unanswered, waiting_only=False))
        return [entry.future.result() for entry in entries]

    async def abandon(self, key: str, failed: JobFailed) -> int:
        """Fail this process's jobs still waiting on ``key`` (no worker will come for them)."""
        mine = [e.job_id for e in self.pending.values() if e.key == key and not e.future.done()]
        taken = await self._store.withdraw(mine, waiting_only=True) if mine else []
        for job_id in taken:
            self.resolve(job_id, failed)
        return len(taken)

    # -- worker side -------------------------------------------------------------------------

    async def lease(
        self,
        key: str,
        worker_id: str,
        *,
        max_items: int,
        wait_s: float,
        tags: frozenset[str] = frozenset(),
        fill_s: float = 0.0,
        max_tokens: int | None = None,
        hold_s: float | None = None,
        pace: tuple[float, float] | None = None,
    ) -> list[Job]:
        """Hand the worker waiting jobs totalling at most max_items inputs and max_tokens
        estimated tokens (but at least one job), waiting up to wait_s for the first.

        ``pace`` is the worker's engine, measured: a call takes ``call_s + token_s * tokens``. With
        it, the jobs taken are also bounded so that the call ends within the objective of the most
        urgent class waiting or recently arriving (``budgets``): a job of that class that arrives
        while the call runs waits for a short call, not a full one; with only bulk work about, the
        call is full (throughput).

        ``fill_s`` is how long the worker's engine stays busy, counted from this call: until
        just before then (``JUST_IN_TIME_S``) the lease takes nothing, however much waits, and
        then takes what there is. Jobs are chosen when the engine can start them, not a batch
        time earlier: an interactive request, or a light tenant's, that arrives meanwhile goes
        into the next batch ahead of the flood (a batch taken early would be the flood's)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        take_at = min(loop.time() + fill_s - JUST_IN_TIME_S, deadline)
        hold = min(max(hold_s or self._lease_ttl_s, MIN_HOLD_S), self._lease_ttl_s)
        if loop.time() < take_at:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), take_at - loop.time())
        while not self._closing:
            seen = self._inputs_arrived.get(key, 0)  # taken before looking, so that no arrival is missed
            ask = Ask(worker_id, tags, max_items, max_tokens, 1, hold, self.budgets(key, pace))
            taken = await self._store.take(key, ask)
            if taken.jobs:
                self._note_engine(key, worker_id, pace, taken.jobs, max_items, max_tokens)
                return taken.jobs
            now = loop.time()
            if now >= deadline:
                return []
            await self._inputs_after(key, seen, 1, min(deadline - now, WAKE_POLL_S))
        return []

    async def answer(self, worker_id: str, answers: list[Answer], expect: Expect) -> Settled:
        """Record a worker's answers: those under its current leases that are right reach their
        clients; those that are wrong are refused, and their jobs go back in line."""
        wrong = {job_id: found for job_id, _, outcome in answers if (found := problem(outcome, expect))}
        verdicts = await self._store.settle(worker_id, answers, set(wrong))
        settled = Settled()
        for (job_id, _, outcome), verdict in zip(answers, verdicts):
            if verdict is Verdict.ACCEPTED:
                settled.accepted += 1
            elif verdict is Verdict.STALE:
                settled.stale += 1
            else:
                misfit = "not one row per input, of the job's width or kind" if isinstance(outcome, JobDone) else None
                settled.refused[job_id] = wrong.get(job_id) or misfit or "an input index outside the job"
        return settled

    async def release(self, worker_id: str, refs: list[tuple[str, str]]) -> int:
        """Jobs the worker gives back go back in line now; how many were its own."""
        return await self._store.give_back(worker_id, refs)

    def release_soon(self, worker_id: str, refs: list[tuple[str, str]]) -> None:
        """``release``, from a task of its own: for a caller being cancelled, which cannot await."""
        if refs:
            self._in_background(self.release(worker_id, refs))

    async def release_worker(self, worker_id: str) -> None:
        """The worker left, or the registry dropped it: its jobs go back in line at once."""
        for engines in self._engines.values():
            engines.pop(worker_id, None)
        reclaimed = await self._store.release_worker(worker_id)
        if reclaimed.requeued or reclaimed.failed:
            log.warning(
                "worker %s is gone: %d of its jobs back in line, %d failed", worker_id, reclaimed.requeued, reclaimed.failed
            )
            await self._reclaimed("departed", reclaimed)

    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        return await self._store.is_leased(job_id, lease_id)

    def stats(self) -> dict[str, QueueStats]:
        return self._store.stats()

    async def held(self, worker_ids: list[str]) -> dict[str, int]:
        """Jobs each worker holds now: the console's leases column."""
        return await self._store.held(worker_ids)

    def speed(self, key: str) -> float | None:
        """Estimated tokens per second that the engines leasing from queue ``key`` drain while it
        is backlogged, from the paces their recent leases brought (None: none known): what
        admission predicts waits with before it has measured the queue's own answers. Not known
        while any of them leases without a pace (a worker of protocol 2, or one not yet measured):
        the sum would be too low, and refuse what fits."""
        now, engines = self._clock(), self._engines.get(key, {})
        for worker_id in [w for w, engine in engines.items() if now - engine.at > PACE_FOR_S]:
            del engines[worker_id]
        speeds = [engine.tokens_per_s() for engine in engines.values()]
        return None if not speeds or None in speeds else sum(s for s in speeds if s is not None)

    def _note_engine(
        self, key: str, worker_id: str, pace: tuple[float, float] | None, jobs: list[Job], max_items: int,
        max_tokens: int | None,
    ) -> None:  # fmt: skip
        engine = _Engine(self._clock())
        if pace is not None:
            call_s, token_s = pace
            per_input = max(1.0, sum(job.tokens for job in jobs) / sum(len(job.inputs) for job in jobs))
            bounds = [max_items * per_input, _call_tokens(None, pace), max_tokens]
            call_tokens = min(bound for bound in bounds if bound is not None)
            if call_s + token_s * call_tokens > 0:
                engine = _Engine(engine.at, call_s, token_s, call_tokens)
        self._engines.setdefault(key, {})[worker_id] = engine

    def budgets(self, key: str, pace: tuple[float, float] | None) -> Budgets:
        """Per class, the estimated tokens of a call whose most urgent waiting job is of that
        class, on an engine of this ``pace`` (None: no bound). A job waits for the call running
        when it arrives, then rides in one: each gets half the objective of its class, or of a
        more urgent class that arrived in the last RECENT_S (its next job will likely arrive
        while the call runs). A class without an objective gets full calls (``FULL_CALL``)."""
        if pace is None:
            return (None,) * len(CLASSES)
        now = self._clock()
        arrived = self._arrived_at.get(key, ())
        recent = min((c for c, at in enumerate(arrived) if now - at <= RECENT_S), default=len(CLASSES))

        def bound(c: int) -> int | None:  # the tightest of its own class's and the more urgent ones'
            bounds = [b for u in range(min(c, recent), c + 1) if (b := _call_tokens(self._objectives[u], pace)) is not None]
            return min(bounds, default=None)

        return tuple(bound(c) for c in CLASSES)

    # -- what stores call back on ----------------------------------------------------------------

    def wake(self, key: str, inputs: int, priority: int | None = None) -> None:
        self._inputs_arrived[key] = self._inputs_arrived.get(key, 0) + inputs
        if priority is not None:
            self.arrived(key, priority)
        event = self._arrived.pop(key, None)
        if event is not None:
            event.set()

    def arrived(self, key: str, priority: int) -> None:
        if 0 <= priority < len(CLASSES):
            self._arrived_at.setdefault(key, [-math.inf] * len(CLASSES))[priority] = self._clock()

    def resolve(self, job_id: str, outcome: Outcome) -> None:
        entry = self.pending.get(job_id)
        if entry is not None and not entry.future.done():
            entry.future.set_result(outcome)

    def exhausted(self, job_id: str, attempts: int, reason: Reason) -> None:
        log.warning("job %s failed after %d attempts: %s", job_id, attempts, _REASONS[reason])
        self.resolve(
            job_id,
            JobFailed(
                "attempts_exhausted",
                f"no worker finished this job in {attempts} attempts ({_REASONS[reason]})",
            ),
        )

    # -- inside ------------------------------------------------------------------------------

    async def _inputs_after(self, key: str, seen: int, needed: int, timeout_s: float) -> None:
        """Wait until ``needed`` inputs arrived on key since the count was ``seen`` (or timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._inputs_arrived.get(key, 0) - seen < needed and not self._closing:
                    event = self._arrived.get(key)
                    if event is None:
                        event = self._arrived[key] = asyncio.Event()
                    await event.wait()
        except TimeoutError:
            pass

    async def _reclaimed(self, reason: Reason, reclaimed: Reclaimed) -> None:
        if self._on_reclaimed is not None:
            await self._on_reclaimed(reason, reclaimed)

    def _wake_all(self) -> None:
        for key in list(self._arrived):
            self.wake(key, 1_000_000)  # enough for any waiting lease to look again

    async def _upkeep_forever(self) -> None:
        period = min(1.0, self._lease_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                reclaimed = await self._store.expire()
                if reclaimed.requeued or reclaimed.failed:
                    await self._reclaimed("expired", reclaimed)
                await self._store.upkeep()
            except QueueUnavailable as exc:
                log.debug("queue upkeep: %s", exc)

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        if self._stopped:
            work.close()
            return
        task = asyncio.ensure_future(self._quietly(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(work: Coroutine[Any, Any, Any]) -> None:
        try:
            await work
        except QueueUnavailable as exc:
            log.warning("a queue call in the background failed: %s", exc)


def _call_tokens(objective: float | None, pace: tuple[float, float]) -> int | None:
    """The estimated tokens of a call that ends within half ``objective`` (None: a full call) on
    an engine of this pace; None where nothing bounds it. Never fewer than the tokens that cost
    as much as the call's fixed part: where that part alone outlasts the objective, smaller calls
    cannot meet it, they would only spend the engine on starting calls (a second engine can)."""
    call_s, token_s = pace
    if token_s <= 0 or (objective is None and call_s <= 0):
        return None  # no part per token, or no fixed part to size a full call by
    longest = objective / 2 if objective is not None else FULL_CALL * call_s
    return max(1, round(call_s / token_s), round((longest - call_s) / token_s))
