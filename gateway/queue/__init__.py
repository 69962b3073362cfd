"""The job queue: one core (``core.py``) on a store of jobs and leases, in this process's memory
(``memory.py``) or in Redis, shared by replicas (``redis.py``). The store's contract and the
order it keeps are in ``store.py``; the data that passes through, in ``jobs.py``."""

from gateway.queue.core import Expect, JobQueue, Settled
from gateway.queue.jobs import (
    BATCH,
    DEFAULT,
    INTERACTIVE,
    Answer,
    JobDone,
    JobFailed,
    JobFailure,
    JobSpec,
    Placement,
    QueueStats,
    QueueTimeout,
    QueueUnavailable,
)
from gateway.queue.memory import MemoryStore
from gateway.queue.redis import RedisStore
from gateway.queue.store import Reason, Reclaimed

__all__ = [
    "BATCH",
    "DEFAULT",
    "INTERACTIVE",
    "Answer",
    "Expect",
    "JobDone",
    "JobFailed",
    "JobFailure",
    "JobQueue",
    "JobSpec",
    "MemoryStore",
    "Placement",
    "QueueStats",
    "QueueTimeout",
    "QueueUnavailable",
    "Reason",
    "Reclaimed",
    "RedisStore",
    "Settled",
]
