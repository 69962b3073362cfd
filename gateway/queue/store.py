"""What a queue backend supplies: storage primitives, each atomic. Everything else (request
futures, timeouts, withdrawal, the fill window, lease lengths, what an exhausted job's client is
told) is the core's (``core.py``), written once for every backend.

The order every store keeps, per queue: priority class first (``jobs.CLASSES``), then within a
class self-clocked fair queueing over tenants. A job's *tag* is

    tag = max(V, last[tenant]) + cost / weight        (cost: the job's estimated tokens)

where ``last[tenant]`` is the tag of that tenant's previous job in the class and ``V`` (the
class's virtual clock) is the tag of the job most recently leased. Jobs are leased in tag order;
so one tenant's jobs keep their arrival order, and a tenant that floods the queue gets its
weighted share and no more: another tenant's new job is tagged just after ``V``, ahead of the
flood's backlog. A job that comes back (expired, given back, its worker gone) takes the front
of its class: ``tag = min(its own tag, the lowest waiting tag)``.

A lease belongs to the worker that took it: answers and give-backs count only from that worker
under the current lease id. An answer that does not fit its job (``fits``: a row per input of the
job's width, an error index within the inputs) is *refused*: the job goes back in line, as if given back. When a
job comes back, it keeps its attempts; past ``max_attempts`` leases its client is told so instead
(``Core.exhausted``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal, Protocol

from contract.messages import Job
from gateway.loops import Loops
from gateway.queue.jobs import Answer, JobDone, Outcome, Pending, QueueStats

# Why a lease ended without an answer.
Reason = Literal["expired", "released", "departed", "refused"]


class Verdict(IntEnum):
    """What became of one answer."""

    STALE = 0  # not the worker's current lease: ignored
    ACCEPTED = 1
    REFUSED = 2  # under the worker's lease, but not an answer to that job: back in line


def fits(inputs: int, shape: str, outcome: Outcome) -> bool:
    """Whether an outcome can be the answer to a job of ``inputs`` inputs whose answer has this
    ``shape`` (``JobSpec.shape``; the Redis store's ANSWER script checks the same in Lua)."""
    if isinstance(outcome, JobDone):
        return len(outcome.vectors) == inputs and answer_shape(outcome) == shape and len(outcome.prompt_tokens) == inputs
    return outcome.input_index is None or 0 <= outcome.input_index < inputs


def answer_shape(done: JobDone) -> str:
    """What an answer carries, as ``JobSpec.shape`` says it: its vectors' columns, or (with no
    columns) token ids alone, "t", or texts alone, "x"; anything else fits no job."""
    columns = done.vectors.shape[1]
    if columns or (done.token_ids is None) == (done.texts is None):
        return str(columns) if done.token_ids is None and done.texts is None else "?"
    return "t" if done.token_ids is not None else "x"


def fair_tag(clock: float, last: float, cost: int, weight: float) -> float:
    """The finish tag of a tenant's next job (see the module's docstring); the Redis store's
    scripts compute the same in Lua."""
    return max(clock, last) + max(cost, 1) / weight


# Per priority class, the estimated tokens a call may hold when its most urgent job is of that
# class (None: as many as the ask's other limits allow); see JobQueue.budgets. A call so bounded
# holds no job of a lower class: those would lengthen the call its urgent jobs wait for, to save
# one engine call's fixed part.
Budgets = tuple[int | None, ...]


@dataclass(frozen=True)
class Ask:
    """One lease attempt by one worker."""

    worker_id: str
    tags: frozenset[str]  # the worker's: it may take only jobs whose tags are all among these
    max_items: int  # inputs, at most (but at least one job)
    max_tokens: int | None  # estimated tokens, at most (but at least one job)
    min_inputs: int  # take nothing unless this many eligible inputs wait
    hold_s: float  # the lease's length
    budgets: Budgets = (None, None, None)  # the call's token bound, by the class of its first job

    def token_bound(self, first_class: int) -> int | None:
        """The estimated tokens a lease may take when its first (most urgent) job is of this class."""
        bounds = [b for b in (self.max_tokens, self.budgets[first_class]) if b is not None]
        return min(bounds) if bounds else None


@dataclass(frozen=True)
class Taken:
    jobs: list[Job]
    available: int  # eligible inputs that were waiting


@dataclass
class Reclaimed:
    """Leases that ended without an answer: jobs put back in line, and jobs failed for good."""

    requeued: int = 0
    failed: int = 0
    workers: set[str] = field(default_factory=set)  # whose leases they were


class Core(Protocol):
    """What a store calls back on: the queue core of this process."""

    pending: dict[str, Pending]

    def wake(self, key: str, inputs: int, priority: int | None = None) -> None:
        """``inputs`` new inputs (of class ``priority``) wait on queue ``key``: waiting leases may look again."""

    def arrived(self, key: str, priority: int) -> None:
        """A job of class ``priority`` arrived on queue ``key`` (from this replica or another)."""

    def resolve(self, job_id: str, outcome: Outcome) -> None:
        """Hand an outcome to this process's waiting client, if it still waits."""

    def exhausted(self, job_id: str, attempts: int, reason: Reason) -> None:
        """The job used its last attempt: fail it for its client, saying why."""


class Store(ABC):
    def bind(self, core: Core, max_attempts: int) -> None:
        self.core = core
        self.max_attempts = max_attempts

    async def start(self, loops: Loops) -> None:  # noqa: B027 - a store without background work need not override it
        """Start background work, if the store has any."""

    async def stop(self) -> None:  # noqa: B027
        """Stop it."""

    @abstractmethod
    async def put(self, jobs: list[Pending]) -> None:
        """Queue this process's jobs (one request's, all on one queue) in their fair place."""

    @abstractmethod
    async def take(self, key: str, ask: Ask) -> Taken:
        """Lease waiting jobs in order within the ask's limits, or nothing if fewer than
        ``ask.min_inputs`` eligible inputs wait."""

    @abstractmethod
    async def settle(self, worker_id: str, answers: list[Answer], refused: set[str]) -> list[Verdict]:
        """Record the answers of the jobs this worker holds under these leases (others are
        stale: ignored) and deliver them to their clients; but refuse those whose job id is in
        ``refused`` (the core found them wrong) or that do not ``fit`` their job."""

    @abstractmethod
    async def give_back(self, worker_id: str, refs: list[tuple[str, str]]) -> int:
        """Put these (job id, lease id) of the worker back in line now; how many were its own."""

    @abstractmethod
    async def release_worker(self, worker_id: str) -> Reclaimed:
        """The worker is gone: every job it holds goes back in line."""

    @abstractmethod
    async def expire(self) -> Reclaimed:
        """Put the jobs of expired leases back in line."""

    @abstractmethod
    async def withdraw(self, job_ids: list[str], waiting_only: bool) -> list[str]:
        """Take these jobs out (with waiting_only, only those not leased); the ids of the
        waiting ones taken."""

    @abstractmethod
    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        """Whether the job is still out under this lease."""

    @abstractmethod
    async def held(self, worker_ids: list[str]) -> dict[str, int]:
        """How many jobs each of these workers holds now (across replicas)."""

    async def upkeep(self) -> None:  # noqa: B027
        """Periodic repairs and figures, if the store needs any (every second or so)."""

    @abstractmethod
    def stats(self) -> dict[str, QueueStats]:
        """Per queue key, for metrics and health: this process's own jobs (so that the figures
        of several replicas add up), at most a second old."""
