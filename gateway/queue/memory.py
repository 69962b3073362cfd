"""The queue's store in this process's memory (``EMBEDQ_QUEUE=memory``, the default): plain dicts
and sorted lists, each call atomic because it never awaits. The order it keeps is the one
``store.py`` describes."""

from __future__ import annotations

import bisect
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.queue.jobs import CLASSES, Answer, Pending, QueueStats
from gateway.queue.store import Ask, Reason, Reclaimed, Store, Taken, Verdict, fair_tag, fits


@dataclass(eq=False)
class _Entry:
    job: Pending
    tag: float
    seq: int
    attempts: int = 0
    lease_id: str = ""
    worker: str = ""
    deadline: float = 0.0

    def order(self) -> tuple[float, int]:
        return self.tag, self.seq


@dataclass
class _Class:
    """One priority class of one queue: its waiting jobs in fair order, and its virtual clock."""

    waiting: list[_Entry] = field(default_factory=list)  # sorted by (tag, seq)
    clock: float = 0.0
    last: dict[str, float] = field(default_factory=dict)  # tenant -> its latest tag

    def insert(self, entry: _Entry) -> None:
        bisect.insort(self.waiting, entry, key=_Entry.order)

    def remove(self, entry: _Entry) -> bool:
        at = bisect.bisect_left(self.waiting, entry.order(), key=_Entry.order)
        if at < len(self.waiting) and self.waiting[at] is entry:
            del self.waiting[at]
            return True
        return False


class MemoryStore(Store):
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._queues: dict[str, list[_Class]] = {}
        self._waiting: dict[str, _Entry] = {}  # job id -> entry, while it waits
        self._leased: dict[str, _Entry] = {}  # job id -> entry, while a worker holds it
        self._held: dict[str, set[str]] = {}  # worker id -> the job ids it holds
        self._seq = itertools.count()

    async def put(self, jobs: list[Pending]) -> None:
        for job in jobs:
            placement = job.placement
            cls = self._classes(job.key)[placement.priority]
            tag = fair_tag(cls.clock, cls.last.get(placement.tenant, 0.0), job.spec.tokens, placement.weight)
            cls.last[placement.tenant] = tag
            entry = _Entry(job, tag, next(self._seq))
            cls.insert(entry)
            self._waiting[job.job_id] = entry
        self.core.wake(jobs[0].key, sum(len(job.spec.inputs) for job in jobs), jobs[0].placement.priority)

    async def take(self, key: str, ask: Ask) -> Taken:
        taken: list[_Entry] = []
        available = items = tokens = 0
        full = False
        bound: int | None = None  # set by the first job taken: its class is the most urgent waiting
        first, bounded = 0, False  # a call bounded by its first class's objective holds no lower class
        for cls in self._queues.get(key, ()):
            for entry in cls.waiting:
                spec = entry.job.spec
                if not spec.tags <= ask.tags:
                    continue  # for workers with other tags: it keeps its place
                available += len(spec.inputs)
                priority = entry.job.placement.priority
                if not taken:
                    first, bound = priority, ask.token_bound(priority)
                    bounded = ask.budgets[priority] is not None
                if not full:
                    if taken and (
                        items + len(spec.inputs) > ask.max_items
                        or (bound is not None and tokens + spec.tokens > bound)
                        or (bounded and priority > first)
                    ):
                        full = True
                    else:
                        taken.append(entry)
                        items, tokens = items + len(spec.inputs), tokens + spec.tokens
                if full and available >= ask.min_inputs:
                    break
            if full and available >= ask.min_inputs:
                break
        if available < ask.min_inputs:
            return Taken([], available)
        deadline = self._clock() + ask.hold_s
        for entry in taken:
            cls = self._classes(key)[entry.job.placement.priority]
            cls.remove(entry)
            cls.clock = max(cls.clock, entry.tag)
            del self._waiting[entry.job.job_id]
            entry.attempts += 1
            entry.lease_id, entry.worker, entry.deadline = uuid.uuid4().hex, ask.worker_id, deadline
            self._leased[entry.job.job_id] = entry
            self._held.setdefault(ask.worker_id, set()).add(entry.job.job_id)
        return Taken([e.job.spec.as_job(e.job.job_id, e.lease_id, e.job.placement.priority) for e in taken], available)

    async def settle(self, worker_id: str, answers: list[Answer], refused: set[str]) -> list[Verdict]:
        verdicts = []
        for job_id, lease_id, outcome in answers:
            entry = self._unlease(job_id, lease_id, worker_id)
            if entry is None:
                verdicts.append(Verdict.STALE)
            elif job_id in refused or not fits(len(entry.job.spec.inputs), entry.job.spec.shape, outcome):
                self._requeue_or_fail(entry, "refused", Reclaimed())
                verdicts.append(Verdict.REFUSED)
            else:
                self.core.resolve(job_id, outcome)
                verdicts.append(Verdict.ACCEPTED)
        return verdicts

    async def give_back(self, worker_id: str, refs: list[tuple[str, str]]) -> int:
        given = [entry for job_id, lease_id in refs if (entry := self._unlease(job_id, lease_id, worker_id))]
        reclaimed = Reclaimed()
        for entry in given:
            self._requeue_or_fail(entry, "released", reclaimed)
        return len(given)

    async def release_worker(self, worker_id: str) -> Reclaimed:
        reclaimed = Reclaimed()
        for job_id in sorted(self._held.get(worker_id, ())):
            entry = self._leased[job_id]
            self._unlease(job_id, entry.lease_id, worker_id)
            self._requeue_or_fail(entry, "departed", reclaimed)
        return reclaimed

    async def expire(self) -> Reclaimed:
        now = self._clock()
        reclaimed = Reclaimed()
        for entry in [e for e in self._leased.values() if e.deadline <= now]:
            reclaimed.workers.add(entry.worker)
            self._unlease(entry.job.job_id, entry.lease_id, entry.worker)
            self._requeue_or_fail(entry, "expired", reclaimed)
        return reclaimed

    async def withdraw(self, job_ids: list[str], waiting_only: bool) -> list[str]:
        taken = []
        for job_id in job_ids:
            entry = self._waiting.pop(job_id, None)
            if entry is not None:
                self._classes(entry.job.key)[entry.job.placement.priority].remove(entry)
                taken.append(job_id)
            elif not waiting_only and (entry := self._leased.get(job_id)) is not None:
                self._unlease(job_id, entry.lease_id, entry.worker)
        return taken

    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        entry = self._leased.get(job_id)
        return entry is not None and entry.lease_id == lease_id

    async def held(self, worker_ids: list[str]) -> dict[str, int]:
        return {worker_id: len(self._held.get(worker_id, ())) for worker_id in worker_ids}

    def stats(self) -> dict[str, QueueStats]:
        now = self._clock()
        leased: dict[str, int] = {}
        for entry in self._leased.values():
            leased[entry.job.key] = leased.get(entry.job.key, 0) + 1
        stats = {}
        for key, classes in self._queues.items():
            waiting = [entry for cls in classes for entry in cls.waiting]
            oldest = min((entry.job.enqueued_at for entry in waiting), default=now)
            stats[key] = QueueStats(depth=len(waiting), leased=leased.get(key, 0), oldest_age_s=now - oldest)
        return stats

    def _classes(self, key: str) -> list[_Class]:
        classes = self._queues.get(key)
        if classes is None:
            classes = self._queues[key] = [_Class() for _ in CLASSES]
        return classes

    def _unlease(self, job_id: str, lease_id: str, worker_id: str) -> _Entry | None:
        """End a lease, if it is the job's current one and the worker's."""
        entry = self._leased.get(job_id)
        if entry is None or entry.lease_id != lease_id or entry.worker != worker_id:
            return None
        del self._leased[job_id]
        held = self._held.get(worker_id)
        if held is not None:
            held.discard(job_id)
            if not held:
                del self._held[worker_id]
        entry.lease_id = entry.worker = ""
        return entry

    def _requeue_or_fail(self, entry: _Entry, reason: Reason, reclaimed: Reclaimed) -> None:
        """Back to the front of its class, unless it used its last attempt."""
        job = entry.job
        if job.future.done():
            return  # its client is no longer waiting: nothing to do it for
        if entry.attempts >= self.max_attempts:
            reclaimed.failed += 1
            self.core.exhausted(job.job_id, entry.attempts, reason)
            return
        cls = self._classes(job.key)[job.placement.priority]
        if cls.waiting:
            entry.tag = min(entry.tag, cls.waiting[0].tag)
        cls.insert(entry)
        self._waiting[job.job_id] = entry
        reclaimed.requeued += 1
        self.core.wake(job.key, len(job.spec.inputs), job.placement.priority)
