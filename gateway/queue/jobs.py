"""What the queue holds and hands back: job specs, where a job stands in line, outcomes, and the
queue's own errors. Shared by the core and every store."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.messages import ErrorCode, Job, JobInput, JobKind

# Priority classes, served in this order; fair shares apply within a class.
INTERACTIVE, DEFAULT, BATCH = 0, 1, 2
CLASSES = (INTERACTIVE, DEFAULT, BATCH)


@dataclass(frozen=True)
class JobSpec:
    model: str
    inputs: list[JobInput]
    truncate: bool = False
    tags: frozenset[str] = frozenset()  # only a worker carrying all of these may take the job
    tokens: int = 0  # estimated: a lease's token budget, and the job's cost in its tenant's share
    kind: JobKind = "embed"
    width: int = 0  # the columns its answer must have: the model's dimensions, 1 for scores, 0 for (de)tokenizing
    pairs_with: list[str] = field(default_factory=list)  # score: the second text of each pair
    special_tokens: bool = True  # tokenize: count the model's special tokens too

    @property
    def shape(self) -> str:
        """What its answer must carry (``store.answer_shape``): so many columns of vectors, or the
        token ids of a tokenize job, or the texts of a detokenize job."""
        return {"tokenize": "t", "detokenize": "x"}.get(self.kind, str(self.width))

    def job_fields(self, priority: int) -> dict[str, Any]:
        """What a worker is sent of this job, besides its ids (``priority``: its class)."""
        return {"model": self.model, "kind": self.kind, "inputs": self.inputs, "pairs_with": self.pairs_with,
                "truncate": self.truncate, "special_tokens": self.special_tokens, "priority": priority,
                "tokens": self.tokens}  # fmt: skip

    def as_job(self, job_id: str, lease_id: str, priority: int) -> Job:
        return Job.model_construct(job_id=job_id, lease_id=lease_id, **self.job_fields(priority))  # built by us: no need to check


@dataclass(frozen=True)
class Placement:
    """Where a request's jobs stand in line: its priority class first, then a fair share of that
    class among tenants (weighted), then arrival order within the tenant."""

    priority: int = DEFAULT
    tenant: str = ""  # the API key's name; "" for anonymous clients, who are one tenant
    weight: float = 1.0


@dataclass(frozen=True)
class JobDone:
    vectors: np.ndarray  # (len(inputs), width) float32: embeddings, scores, or nothing (width 0)
    prompt_tokens: list[int]
    token_ids: list[list[int]] | None = None  # tokenize
    texts: list[str] | None = None  # detokenize


@dataclass(frozen=True)
class JobFailed:
    # The worker's codes, plus attempts_exhausted when no worker finished it in max_attempts leases.
    code: ErrorCode | str
    message: str
    input_index: int | None = None


Outcome = JobDone | JobFailed
Answer = tuple[str, str, Outcome]  # job id, lease id, outcome


@dataclass(eq=False)
class Pending:
    """One of this process's jobs, while its client waits."""

    job_id: str
    key: str  # the queue: the checkpoint its model is served by
    spec: JobSpec
    placement: Placement
    future: asyncio.Future
    enqueued_at: float
    odd_rounds: int = 0  # Redis repair: consecutive checks that found it lost, or answered but not taken


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
