"""The in-memory queue: leases, stale answers, expiry, attempts, withdrawal."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.memory_queue import InMemoryQueue
from gateway.queue import JobDone, JobFailed, JobFailure, JobSpec, QueueTimeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _done(rows: int, value: float = 1.0) -> JobDone:
    return JobDone(np.full((rows, 2), value, dtype=np.float32), [3] * rows)


def _specs(*sizes: int) -> list[JobSpec]:
    return [JobSpec("m", [f"text {i}" for i in range(n)]) for n in sizes]


async def _queue(**kwargs) -> InMemoryQueue:
    queue = InMemoryQueue(lease_ttl_s=kwargs.pop("lease_ttl_s", 30), max_attempts=kwargs.pop("max_attempts", 3), **kwargs)
    await queue.start()
    return queue


async def test_jobs_come_back_in_order():
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 2), timeout_s=5))
    jobs = await queue.lease("k", max_items=10, wait_s=1)
    assert [len(j.inputs) for j in jobs] == [1, 2]
    # Answer out of order: the request still gets its jobs in order.
    assert queue.complete(jobs[1].job_id, jobs[1].lease_id, _done(2, 2.0))
    assert queue.complete(jobs[0].job_id, jobs[0].lease_id, _done(1, 1.0))
    done = await run
    assert [d.vectors[0, 0] for d in done] == [1.0, 2.0]
    await queue.stop()


async def test_lease_packs_jobs_up_to_max_items_but_always_one():
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(5, 5, 5), timeout_s=5))
    await asyncio.sleep(0)
    assert [len(j.inputs) for j in await queue.lease("k", max_items=3, wait_s=0)] == [5]  # one, even if too big
    assert [len(j.inputs) for j in await queue.lease("k", max_items=10, wait_s=0)] == [5, 5]
    run.cancel()
    await queue.stop()


async def test_empty_lease_waits_then_returns_nothing():
    queue = await _queue()
    started = asyncio.get_running_loop().time()
    assert await queue.lease("k", max_items=10, wait_s=0.2) == []
    assert asyncio.get_running_loop().time() - started >= 0.19
    await queue.stop()


async def test_a_waiting_lease_wakes_when_jobs_arrive():
    queue = await _queue()
    lease = asyncio.create_task(queue.lease("k", max_items=10, wait_s=5))
    await asyncio.sleep(0.05)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    jobs = await asyncio.wait_for(lease, 1)
    assert len(jobs) == 1
    run.cancel()
    await queue.stop()


async def test_answers_with_a_wrong_or_repeated_lease_are_ignored():
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    (job,) = await queue.lease("k", max_items=10, wait_s=1)
    assert not queue.complete(job.job_id, "not-the-lease", _done(1))
    assert not queue.complete("no-such-job", job.lease_id, _done(1))
    assert queue.complete(job.job_id, job.lease_id, _done(1, 7.0))
    assert not queue.complete(job.job_id, job.lease_id, _done(1, 8.0))  # a second answer
    assert not queue.fail(job.job_id, job.lease_id, JobFailed("engine_error", "late"))
    assert (await run)[0].vectors[0, 0] == 7.0
    await queue.stop()


async def test_expired_lease_is_requeued_and_the_late_answer_ignored():
    expired: list[bool] = []
    queue = await _queue(lease_ttl_s=0.2, on_expired=expired.append)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    (first,) = await queue.lease("k", max_items=10, wait_s=1)
    (second,) = await queue.lease("k", max_items=10, wait_s=2)  # handed out again after expiry
    assert second.job_id == first.job_id and second.lease_id != first.lease_id
    assert expired == [True]
    assert not queue.complete(first.job_id, first.lease_id, _done(1, 1.0))  # the slow worker comes back
    assert queue.complete(second.job_id, second.lease_id, _done(1, 2.0))
    assert (await run)[0].vectors[0, 0] == 2.0
    await queue.stop()


async def test_a_job_fails_after_max_attempts():
    queue = await _queue(lease_ttl_s=0.1, max_attempts=2)
    run = asyncio.create_task(queue.run("k", _specs(1), timeout_s=5))
    await queue.lease("k", max_items=10, wait_s=1)
    await queue.lease("k", max_items=10, wait_s=1)
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.failure.code == "attempts_exhausted"
    assert queue.stats()["k"].depth == 0 and queue.stats()["k"].leased == 0
    await queue.stop()


async def test_first_failure_fails_the_request_and_withdraws_the_rest():
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1, 1), timeout_s=5))
    second = (await queue.lease("k", max_items=2, wait_s=1))[1]
    assert queue.fail(second.job_id, second.lease_id, JobFailed("input_too_long", "too long", 0))
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.job_index == 1
    stats = queue.stats()["k"]
    assert (stats.depth, stats.leased) == (0, 0)
    await queue.stop()


async def test_timeout_withdraws_queued_jobs():
    queue = await _queue()
    with pytest.raises(QueueTimeout):
        await queue.run("k", _specs(1, 1), timeout_s=0.1)
    assert queue.stats()["k"].depth == 0
    assert await queue.lease("k", max_items=10, wait_s=0) == []
    await queue.stop()


async def test_cancelled_request_leaves_nothing_behind():
    """The client went away: its queued jobs are never handed to a worker."""
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1, 1), timeout_s=5))
    (leased,) = await queue.lease("k", max_items=1, wait_s=1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert await queue.lease("k", max_items=10, wait_s=0) == []
    assert not queue.complete(leased.job_id, leased.lease_id, _done(1))
    stats = queue.stats()["k"]
    assert (stats.depth, stats.leased) == (0, 0)
    await queue.stop()


async def test_stats_report_depth_and_age():
    queue = await _queue()
    run = asyncio.create_task(queue.run("k", _specs(1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    stats = queue.stats()["k"]
    assert stats.depth == 2 and stats.oldest_age_s >= 0.04
    run.cancel()
    await queue.stop()


async def test_a_lease_with_fill_waits_for_a_full_batch_but_no_longer_than_fill():
    queue = await _queue()
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
    await queue.stop()


async def test_a_lease_keeps_within_its_token_budget_but_takes_at_least_one_job():
    queue = await _queue()
    big = [JobSpec("m", ["x"], tokens=300), JobSpec("m", ["y"], tokens=300), JobSpec("m", ["z"], tokens=300)]
    run = asyncio.create_task(queue.run("k", big, timeout_s=5))
    await asyncio.sleep(0)
    assert len(await queue.lease("k", max_items=10, wait_s=0, max_tokens=100)) == 1  # over budget, but one
    assert len(await queue.lease("k", max_items=10, wait_s=0, max_tokens=700)) == 2
    run.cancel()
    await queue.stop()
