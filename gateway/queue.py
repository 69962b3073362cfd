"""The job queue interface, between the HTTP layer and whatever holds the jobs.

One queue per checkpoint (the ``[queue] checkpoint_name`` a worker serves). The HTTP layer
only ever calls ``run`` (client side) and ``lease`` / ``complete`` / ``fail`` (worker side).
Two backends: ``memory_queue.InMemoryQueue`` (one gateway process) and
``redis_queue.RedisQueue`` (several replicas sharing one Redis). Any call of a shared backend
may raise QueueUnavailable while its server is down.
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from worker.protocol import ErrorCode, Job, JobInput


@dataclass(frozen=True)
class JobSpec:
    model: str
    inputs: list[JobInput]
    truncate: bool = False
    tags: frozenset[str] = frozenset()  # only a worker carrying all of these may take the job
    tokens: int = 0  # estimated, for lease token budgets


@dataclass(frozen=True)
class JobDone:
    vectors: np.ndarray  # (len(inputs), dims) float32
    prompt_tokens: list[int]


@dataclass(frozen=True)
class JobFailed:
    # The worker's codes, plus attempts_exhausted when no worker finished it in max_attempts leases.
    code: ErrorCode | str
    message: str
    input_index: int | None = None


class JobFailure(Exception):
    """One job of a request failed; the request fails with it (the others are withdrawn)."""

    def __init__(self, job_index: int, failure: JobFailed):
        super().__init__(failure.message)
        self.job_index = job_index
        self.failure = failure


class QueueTimeout(Exception):
    """The jobs were not all answered in time; those still queued were withdrawn."""


class QueueUnavailable(Exception):
    """The queue's backend cannot be reached (a shared backend's server is down)."""


@dataclass(frozen=True)
class QueueStats:
    depth: int  # jobs waiting for a worker
    leased: int  # jobs a worker holds
    oldest_age_s: float  # of the oldest waiting job, 0 if none


class JobQueue(ABC):
    @abstractmethod
    async def start(self) -> None:
        """Start background work (lease expiry)."""

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def close_leases(self) -> None:
        """From now on lease calls return at once, empty (the gateway is about to exit)."""

    @abstractmethod
    async def run(self, key: str, specs: list[JobSpec], timeout_s: float) -> list[JobDone]:
        """Queue the jobs and wait for all of them, in order.

        Raises JobFailure on the first failed job and QueueTimeout after timeout_s. However it
        ends (cancellation included: the client went away), no job of it stays queued.
        """

    @abstractmethod
    async def lease(
        self, key: str, max_items: int, wait_s: float, tags: frozenset[str] = frozenset(), fill_s: float = 0.0,
        max_tokens: int | None = None,
    ) -> list[Job]:
        """Hand out waiting jobs totalling at most max_items inputs and max_tokens estimated
        tokens (but at least one job), waiting up to wait_s for the first; each comes with a fresh
        lease id. Only jobs whose tags are all among ``tags`` (the worker's) are handed out.

        ``fill_s`` is how long the worker's engine stays busy, counted from this call: until
        then, a lease that has jobs waits for max_items (the engine could not start them sooner
        anyway); from then on it takes what there is, so an engine that became free never
        waits for a batch to fill."""

    @abstractmethod
    async def complete(self, job_id: str, lease_id: str, done: JobDone) -> bool:
        """Record a result; False (and nothing changes) if the lease is not the current one."""

    @abstractmethod
    async def fail(self, job_id: str, lease_id: str, failed: JobFailed) -> bool:
        """Record a failure; False (and nothing changes) if the lease is not the current one."""

    async def answer(self, answers: list[tuple[str, str, JobDone | JobFailed]]) -> int:
        """Record many (job id, lease id, outcome) at once, as complete / fail would; how many
        were under their current lease. A shared backend does it in one round trip."""
        accepted = 0
        for job_id, lease_id, outcome in answers:
            record = self.complete if isinstance(outcome, JobDone) else self.fail
            accepted += await record(job_id, lease_id, outcome)
        return accepted

    @abstractmethod
    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        """Whether the job is still out under this lease (not answered, expired or withdrawn)."""

    @abstractmethod
    async def release(self, job_id: str, lease_id: str) -> bool:
        """Give a leased job back: requeue it now (or fail it if it used its last attempt).
        False if the lease is not the current one."""

    @abstractmethod
    async def abandon(self, key: str, failed: JobFailed) -> int:
        """Fail every job waiting under ``key`` (no worker will come for them); how many."""

    @abstractmethod
    def stats(self) -> dict[str, QueueStats]:
        """Per queue key, for metrics and health: this process's own jobs (so that the figures
        of several replicas add up), at most a second old."""


def all_answered(futures: list[asyncio.Future], loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """One future for a request's jobs (each future's result a JobDone or JobFailed): done when
    all are answered, or failed with the first JobFailure. Cheaper than asyncio.wait over the
    set, on the hot path."""
    all_done = loop.create_future()
    remaining = len(futures)

    def answered(index: int, future: asyncio.Future) -> None:
        nonlocal remaining
        if all_done.done() or future.cancelled():
            return
        outcome = future.result()
        remaining -= 1
        if isinstance(outcome, JobFailed):
            all_done.set_exception(JobFailure(index, outcome))
        elif remaining == 0:
            all_done.set_result(None)

    for index, future in enumerate(futures):
        future.add_done_callback(functools.partial(answered, index))
    return all_done
