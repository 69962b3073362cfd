"""The job queue, on both backends: leases, stale answers, expiry, attempts, withdrawal.

The Redis cases talk to a real redis-server; the last tests are Redis's own: several replicas
on one Redis, and what a Redis that lost writes or a replica that died leaves behind.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
from redis.asyncio import Redis

from gateway.memory_queue import InMemoryQueue
from gateway.queue import JobDone, JobFailed, JobFailure, JobQueue, JobSpec, QueueTimeout
from gateway.redis_link import RedisLink
from gateway.redis_queue import RedisQueue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _done(rows: int, value: float = 1.0) -> JobDone:
    return JobDone(np.full((rows, 2), value, dtype=np.float32), [3] * rows)


def _specs(*sizes: int) -> list[JobSpec]:
    return [JobSpec("m", [f"text {i}" for i in range(n)]) for n in sizes]


class Backend:
    """Makes queues of one backend (Redis ones share a key prefix: replicas) and closes them."""

    def __init__(self, kind: str, redis_url: str | None):
        self.kind, self.redis_url = kind, redis_url
        self.prefix = "unit-" + uuid.uuid4().hex[:8]
        self._opened: list[tuple[JobQueue, RedisLink | None]] = []

    async def queue(self, lease_ttl_s: float = 30, max_attempts: int = 3, **kwargs) -> JobQueue:
        link = None
        if self.kind == "memory":
            queue: JobQueue = InMemoryQueue(lease_ttl_s, max_attempts, **kwargs)
        else:
            link = RedisLink(self.redis_url, None, self.prefix)
            await link.start()
            queue = RedisQueue(link, lease_ttl_s, max_attempts, **kwargs)
        await queue.start()
        self._opened.append((queue, link))
        return queue

    async def close(self) -> None:
        for queue, link in self._opened:
            await queue.stop()
            if link is not None:
                await link.stop()

    @staticmethod
    async def stats(queue: JobQueue, key: str):
        if isinstance(queue, RedisQueue):
            await queue.check_pending()  # what its upkeep does every second
        return queue.stats()[key]


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> Backend:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    return Backend(request.param, url)


async def test_jobs_come_back_in_order(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 2), timeout_s=5))
    jobs = await queue.lease("k", max_items=10, wait_s=1)
    assert [len(j.inputs) for j in jobs] == [1, 2]
    # Answer out of order: the request still gets its jobs in order.
    assert await queue.complete(jobs[1].job_id, jobs[1].lease_id, _done(2, 2.0))
    assert await queue.complete(jobs[0].job_id, jobs[0].lease_id, _done(1, 1.0))
    done = await run
    assert [d.vectors[0, 0] for d in done] == [1.0, 2.0]
    await backend.close()


async def test_lease_packs_jobs_up_to_max_items_but_always_one(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(5, 5, 5), timeout_s=5))
    await asyncio.sleep(0.05)
    assert [len(j.inputs) for j in await queue.lease("k", max_items=3, wait_s=0)] == [5]  # one, even if too big
    assert [len(j.inputs) for j in await queue.lease("k", max_items=10, wait_s=0)] == [5, 5]
    run.cancel()
    await backend.close()


async def test_empty_lease_waits_then_returns_nothing(backend):
    queue = await backend.queue()
    started = asyncio.get_running_loop().time()
    assert await queue.lease("k", max_items=10, wait_s=0.2) == []
    assert asyncio.get_running_loop().time() - started >= 0.19
    await backend.close()


async def test_a_waiting_lease_wakes_when_jobs_arrive(backend):
    queue = await backend.queue()
    lease = asyncio.create_task(queue.lease("k", max_items=10, wait_s=5))
    await asyncio.sleep(0.05)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    jobs = await asyncio.wait_for(lease, 1)
    assert len(jobs) == 1
    run.cancel()
    await backend.close()


async def test_answers_with_a_wrong_or_repeated_lease_are_ignored(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    (job,) = await queue.lease("k", max_items=10, wait_s=1)
    assert not await queue.complete(job.job_id, "not-the-lease", _done(1))
    assert not await queue.complete("no-such-job", job.lease_id, _done(1))
    assert await queue.complete(job.job_id, job.lease_id, _done(1, 7.0))
    assert not await queue.complete(job.job_id, job.lease_id, _done(1, 8.0))  # a second answer
    assert not await queue.fail(job.job_id, job.lease_id, JobFailed("engine_error", "late"))
    assert (await run)[0].vectors[0, 0] == 7.0
    await backend.close()


async def test_expired_lease_is_requeued_and_the_late_answer_ignored(backend):
    expired: list[bool] = []
    queue = await backend.queue(lease_ttl_s=0.2, on_expired=expired.append)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    (first,) = await queue.lease("k", max_items=10, wait_s=1)
    (second,) = await queue.lease("k", max_items=10, wait_s=2)  # handed out again after expiry
    assert second.job_id == first.job_id and second.lease_id != first.lease_id
    assert expired == [True]
    assert not await queue.complete(first.job_id, first.lease_id, _done(1, 1.0))  # the slow worker comes back
    assert await queue.complete(second.job_id, second.lease_id, _done(1, 2.0))
    assert (await run)[0].vectors[0, 0] == 2.0
    await backend.close()


async def test_a_job_fails_after_max_attempts(backend):
    queue = await backend.queue(lease_ttl_s=0.1, max_attempts=2)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    await queue.lease("k", max_items=10, wait_s=1)
    await queue.lease("k", max_items=10, wait_s=1)
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.failure.code == "attempts_exhausted"
    stats = await backend.stats(queue, "k")
    assert stats.depth == 0 and stats.leased == 0
    await backend.close()


async def test_first_failure_fails_the_request_and_withdraws_the_rest(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1, 1), timeout_s=5))
    second = (await queue.lease("k", max_items=2, wait_s=1))[1]
    assert await queue.fail(second.job_id, second.lease_id, JobFailed("input_too_long", "too long", 0))
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.job_index == 1
    stats = await backend.stats(queue, "k")
    assert (stats.depth, stats.leased) == (0, 0)
    await backend.close()


async def test_timeout_withdraws_queued_jobs(backend):
    queue = await backend.queue()
    with pytest.raises(QueueTimeout):
        await queue.run("k", _specs(1, 1), timeout_s=0.1)
    assert (await backend.stats(queue, "k")).depth == 0
    assert await queue.lease("k", max_items=10, wait_s=0) == []
    await backend.close()


async def test_cancelled_request_leaves_nothing_behind(backend):
    """The client went away: its queued jobs are never handed to a worker."""
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1, 1), timeout_s=5))
    (leased,) = await queue.lease("k", max_items=1, wait_s=1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await queue.lease("k", max_items=10, wait_s=0) == []
    assert not await queue.complete(leased.job_id, leased.lease_id, _done(1))
    stats = await backend.stats(queue, "k")
    assert (stats.depth, stats.leased) == (0, 0)
    await backend.close()


async def test_stats_report_depth_and_age(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    stats = await backend.stats(queue, "k")
    assert stats.depth == 2 and stats.oldest_age_s >= 0.04
    run.cancel()
    await backend.close()


async def test_a_lease_with_fill_waits_for_a_full_batch_but_no_longer_than_fill(backend):
    queue = await backend.queue()
    first = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    lease = asyncio.create_task(queue.lease("k", max_items=3, wait_s=1, fill_s=1.0))
    await asyncio.sleep(0.05)
    assert not lease.done()  # one input is there, but the lease waits to fill
    second = asyncio.create_task(queue.run("k", _specs(2), timeout_s=5))
    jobs = await asyncio.wait_for(lease, 0.5)
    assert sum(len(j.inputs) for j in jobs) == 3
    started = asyncio.get_running_loop().time()
    third = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    assert len(await queue.lease("k", max_items=10, wait_s=1, fill_s=0.2)) == 1  # gave up filling
    assert asyncio.get_running_loop().time() - started >= 0.19
    for task in (first, second, third):
        task.cancel()
    await backend.close()


async def test_fill_counts_from_the_lease_call_so_a_free_engine_never_waits(backend):
    """fill_s is when the engine becomes free: a job arriving after that is taken at once, one
    arriving before it waits only for the rest of it."""
    queue = await backend.queue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    late = asyncio.create_task(queue.lease("k", max_items=10, wait_s=3, fill_s=0.5))
    await asyncio.sleep(0.8)  # the engine is free by now
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    assert len(await late) == 1
    assert loop.time() - started < 1.05  # not 0.8 + another 0.5 of filling
    run.cancel()
    started = loop.time()
    early = asyncio.create_task(queue.lease("k", max_items=10, wait_s=3, fill_s=0.8))
    await asyncio.sleep(0.4)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    assert len(await early) == 1
    assert 0.75 <= loop.time() - started < 1.0  # filled until 0.8, not until 0.4 + 0.8
    run.cancel()
    await backend.close()


async def test_a_lease_keeps_within_its_token_budget_but_takes_at_least_one_job(backend):
    queue = await backend.queue()
    big = [JobSpec("m", ["x"], tokens=300), JobSpec("m", ["y"], tokens=300), JobSpec("m", ["z"], tokens=300)]
    run = asyncio.create_task(queue.run("k", big, timeout_s=5))
    await asyncio.sleep(0.05)
    assert len(await queue.lease("k", max_items=10, wait_s=0, max_tokens=100)) == 1  # over budget, but one
    assert len(await queue.lease("k", max_items=10, wait_s=0, max_tokens=700)) == 2
    run.cancel()
    await backend.close()


# -- Redis only: replicas sharing one Redis ----------------------------------------------------


@pytest.fixture
def replicas(redis_server) -> Backend:
    return Backend("redis", redis_server.url)


async def test_a_job_queued_on_one_replica_is_answered_through_another(replicas):
    owner, other = await replicas.queue(), await replicas.queue()
    run = asyncio.create_task(owner.run("k", _specs(2, 1), timeout_s=5))
    first, second = await other.lease("k", max_items=10, wait_s=1)
    assert await other.complete(first.job_id, first.lease_id, _done(2, 3.0))
    assert await other.complete(second.job_id, second.lease_id, _done(1, 4.0))
    done = await run
    assert [d.vectors[0, 0] for d in done] == [3.0, 4.0] and done[0].prompt_tokens == [3, 3]
    failing = asyncio.create_task(owner.run("k", _specs(1), timeout_s=5))
    (job,) = await other.lease("k", max_items=10, wait_s=1)
    assert await other.fail(job.job_id, job.lease_id, JobFailed("input_too_long", "input too long", 0))
    with pytest.raises(JobFailure) as info:
        await failing
    assert (info.value.failure.code, info.value.failure.input_index) == ("input_too_long", 0)
    await replicas.close()


async def test_concurrent_leases_on_two_replicas_never_share_a_job(replicas):
    a, b = await replicas.queue(), await replicas.queue()
    runs = [asyncio.create_task(q.run("k", _specs(*[1] * 25), timeout_s=10)) for q in (a, b, a, b)]
    seen: list[str] = []

    async def worker(queue: JobQueue) -> None:
        while len(seen) < 100:
            for job in await queue.lease("k", max_items=3, wait_s=0.2):
                seen.append(job.job_id)
                assert await queue.complete(job.job_id, job.lease_id, _done(1))

    await asyncio.wait_for(asyncio.gather(*(worker(q) for q in (a, b, a, b))), 10)
    assert len(seen) == 100 and len(set(seen)) == 100
    await asyncio.gather(*runs)
    await replicas.close()


async def test_an_expired_lease_is_reclaimed_whichever_replica_looks(replicas):
    owner = await replicas.queue(lease_ttl_s=0.3)
    other = await replicas.queue(lease_ttl_s=0.3)
    run = asyncio.create_task(owner.run("k", _specs(1), timeout_s=5))
    (lost,) = await other.lease("k", max_items=10, wait_s=1)  # its worker dies with it
    (again,) = await other.lease("k", max_items=10, wait_s=2)
    assert again.job_id == lost.job_id
    assert not await owner.complete(lost.job_id, lost.lease_id, _done(1, 1.0))
    assert await owner.complete(again.job_id, again.lease_id, _done(1, 2.0))
    assert (await run)[0].vectors[0, 0] == 2.0
    await replicas.close()


async def test_the_jobs_of_a_dead_replica_are_dropped_not_computed(replicas, redis_server):
    doomed, survivor = await replicas.queue(), await replicas.queue()
    run = asyncio.create_task(doomed.run("k", _specs(1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    raw = Redis.from_url(redis_server.url)
    for task in doomed._link._tasks:  # it stops refreshing its liveness key, as a killed process would
        task.cancel()
    await raw.delete(f"{replicas.prefix}:alive:{doomed._link.replica}")
    assert await survivor.lease("k", max_items=10, wait_s=0.2) == []
    assert await raw.llen(f"{replicas.prefix}:q:k") == 0
    assert not await raw.keys(f"{replicas.prefix}:j:*")
    run.cancel()
    await raw.aclose()
    await replicas.close()


async def test_a_job_that_redis_lost_is_queued_again_by_its_owner(replicas, redis_server):
    owner = await replicas.queue()
    run = asyncio.create_task(owner.run("k", _specs(1), timeout_s=5))
    await asyncio.sleep(0.05)
    raw = Redis.from_url(redis_server.url)
    await raw.delete(f"{replicas.prefix}:q:k", *await raw.keys(f"{replicas.prefix}:j:*"))  # as a restart without its last writes
    assert await owner.lease("k", max_items=10, wait_s=0) == []
    await owner.check_pending()
    await owner.check_pending()  # gone on two checks: queued again
    (job,) = await owner.lease("k", max_items=10, wait_s=1)
    assert await owner.complete(job.job_id, job.lease_id, _done(1, 5.0))
    assert (await run)[0].vectors[0, 0] == 5.0
    await raw.aclose()
    await replicas.close()
