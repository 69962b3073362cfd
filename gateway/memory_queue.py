"""The embedded job queue: one process, everything in memory, asyncio all the way.

Leases expire: a job whose worker neither answers nor fails it within ``lease_ttl_s`` goes
back to the front of its queue, until it has been leased ``max_attempts`` times; then its
request fails with ``attempts_exhausted``. Every answer is checked against the job's current
lease id, so an expired lease's late answer is ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.queue import JobDone, JobFailed, JobQueue, JobSpec, QueueStats, QueueTimeout, all_answered
from worker.protocol import Job

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    job_id: str
    key: str
    spec: JobSpec
    future: asyncio.Future
    enqueued_at: float
    attempts: int = 0
    lease_id: str | None = None
    deadline: float = field(default=0.0)


class InMemoryQueue(JobQueue):
    def __init__(
        self, lease_ttl_s: float, max_attempts: int,
        on_expired: Callable[[bool], None] = lambda requeued: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lease_ttl_s = lease_ttl_s
        self._max_attempts = max_attempts
        self._on_expired = on_expired  # for metrics: True if requeued, False if given up
        self._clock = clock
        self._waiting: dict[str, deque[_Entry]] = {}
        self._leased: dict[str, _Entry] = {}
        self._arrivals: dict[str, asyncio.Condition] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._reaper: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._expire_forever())

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()

    async def close_leases(self) -> None:
        self._closing = True
        for key in list(self._arrivals):
            await self._notify(key)

    async def run(self, key: str, specs: list[JobSpec], timeout_s: float) -> list[JobDone]:
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [
            _Entry(f"{self._prefix}-{next(self._ids)}", key, spec, loop.create_future(), now) for spec in specs
        ]
        self._waiting.setdefault(key, deque()).extend(entries)
        await self._notify(key)
        all_done = all_answered([entry.future for entry in entries], loop)
        try:
            async with asyncio.timeout(timeout_s):
                await all_done
        except TimeoutError:
            raise QueueTimeout(f"not answered within {timeout_s:g}s") from None
        finally:
            self._withdraw(entries)
        return [entry.future.result() for entry in entries]

    async def lease(
        self, key: str, max_items: int, wait_s: float, tags: frozenset[str] = frozenset(), fill_s: float = 0.0,
        max_tokens: int | None = None,
    ) -> list[Job]:
        waiting = self._waiting.setdefault(key, deque())

        def has_inputs(wanted: int) -> bool:  # stops counting as soon as it knows
            count = 0
            for entry in waiting:
                if entry.spec.tags <= tags:
                    count += len(entry.spec.inputs)
                    if count >= wanted:
                        return True
            return False

        if self._closing:
            return []
        loop = asyncio.get_running_loop()
        engine_free_at = loop.time() + fill_s  # until then, jobs wait for a full batch
        if not await self._wait_until(key, lambda: has_inputs(1), wait_s):
            return []
        if engine_free_at > loop.time():
            await self._wait_until(key, lambda: has_inputs(max_items), engine_free_at - loop.time())
        if self._closing:
            return []
        taken = self._take(waiting, max_items, tags, max_tokens)
        return [
            Job(job_id=e.job_id, lease_id=e.lease_id, model=e.spec.model, inputs=e.spec.inputs, truncate=e.spec.truncate)
            for e in taken
        ]

    async def _wait_until(self, key: str, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait for jobs under key until ready() (or the queue closes); False on timeout."""
        if self._closing or ready():
            return True
        if timeout_s <= 0:
            return False
        arrivals = self._arrivals_of(key)
        try:
            async with asyncio.timeout(timeout_s), arrivals:
                await arrivals.wait_for(lambda: self._closing or ready())
        except TimeoutError:
            return False
        return True

    def _take(self, waiting: deque[_Entry], max_items: int, tags: frozenset[str], max_tokens: int | None) -> list[_Entry]:
        """Lease the oldest eligible jobs, within max_items inputs and max_tokens, but at least one job."""
        taken: list[_Entry] = []
        skipped: list[_Entry] = []  # jobs for workers with other tags keep their place
        items = tokens = 0
        while waiting:
            entry = waiting[0]
            if not entry.spec.tags <= tags:
                skipped.append(waiting.popleft())
                continue
            if taken and (items + len(entry.spec.inputs) > max_items
                          or (max_tokens is not None and tokens + entry.spec.tokens > max_tokens)):
                break
            waiting.popleft()
            entry.attempts += 1
            entry.lease_id = uuid.uuid4().hex
            entry.deadline = self._clock() + self._lease_ttl_s
            self._leased[entry.job_id] = entry
            items += len(entry.spec.inputs)
            tokens += entry.spec.tokens
            taken.append(entry)
        waiting.extendleft(reversed(skipped))
        return taken

    async def complete(self, job_id: str, lease_id: str, done: JobDone) -> bool:
        return self._answer(job_id, lease_id, done)

    async def fail(self, job_id: str, lease_id: str, failed: JobFailed) -> bool:
        return self._answer(job_id, lease_id, failed)

    def stats(self) -> dict[str, QueueStats]:
        now = self._clock()
        leased: dict[str, int] = {}
        for entry in self._leased.values():
            leased[entry.key] = leased.get(entry.key, 0) + 1
        return {
            key: QueueStats(
                depth=len(waiting), leased=leased.get(key, 0),
                oldest_age_s=now - waiting[0].enqueued_at if waiting else 0.0,
            )
            for key, waiting in self._waiting.items()
        }

    def _answer(self, job_id: str, lease_id: str, outcome: JobDone | JobFailed) -> bool:
        entry = self._leased.get(job_id)
        if entry is None or entry.lease_id != lease_id:
            return False
        del self._leased[job_id]
        if not entry.future.done():
            entry.future.set_result(outcome)
        return True

    def _withdraw(self, entries: list[_Entry]) -> None:
        """Take a finished (or abandoned) request's jobs out of the queue and the lease table."""
        for entry in entries:
            if self._leased.pop(entry.job_id, None) is None and not entry.future.done():
                try:
                    self._waiting[entry.key].remove(entry)
                except ValueError:
                    pass
            if not entry.future.done():
                entry.future.cancel()

    async def _notify(self, key: str) -> None:
        arrivals = self._arrivals_of(key)
        async with arrivals:
            arrivals.notify_all()

    def _arrivals_of(self, key: str) -> asyncio.Condition:
        arrivals = self._arrivals.get(key)  # not setdefault: that would build a Condition on every call
        if arrivals is None:
            arrivals = self._arrivals[key] = asyncio.Condition()
        return arrivals

    async def _expire_forever(self) -> None:
        period = min(1.0, self._lease_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            for key in self._expire_leases():
                await self._notify(key)

    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        entry = self._leased.get(job_id)
        return entry is not None and entry.lease_id == lease_id

    async def release(self, job_id: str, lease_id: str) -> bool:
        entry = self._leased.get(job_id)
        if entry is None or entry.lease_id != lease_id:
            return False
        del self._leased[job_id]
        self._requeue_or_fail(entry, "was given back")
        asyncio.get_running_loop().create_task(self._notify(entry.key))
        return True

    async def abandon(self, key: str, failed: JobFailed) -> int:
        waiting = self._waiting.get(key, deque())
        count = len(waiting)
        while waiting:
            entry = waiting.popleft()
            if not entry.future.done():
                entry.future.set_result(failed)
        return count

    def _expire_leases(self) -> set[str]:
        now = self._clock()
        requeued: set[str] = set()
        for entry in [e for e in self._leased.values() if e.deadline <= now]:
            del self._leased[entry.job_id]
            requeued_now = self._requeue_or_fail(entry, f"expired (timeout {self._lease_ttl_s:g}s)")
            if requeued_now:
                requeued.add(entry.key)
            self._on_expired(requeued_now)
        return requeued

    def _requeue_or_fail(self, entry: _Entry, why: str) -> bool:
        """Back to the front of its queue, unless it used its last attempt; True if requeued."""
        entry.lease_id = None
        if entry.attempts < self._max_attempts:
            self._waiting.setdefault(entry.key, deque()).appendleft(entry)
            return True
        log.warning("job %s failed: its lease %s, attempt %d of %d", entry.job_id, why, entry.attempts, self._max_attempts)
        entry.future.set_result(JobFailed(
            "attempts_exhausted", f"no worker finished this job in {entry.attempts} attempts (its last lease {why})",
        ))
        return False
