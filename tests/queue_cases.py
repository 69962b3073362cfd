"""The queue core's promises, written once and run on every store: ``tests/fast/test_queue.py`` on
the memory store, ``tests/system/test_queue_redis.py`` on a real Redis. A module that imports
these cases provides the ``backend`` fixture (see ``Backend``)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

import numpy as np
import pytest

from gateway.queue import (
    BATCH,
    DEFAULT,
    INTERACTIVE,
    Expect,
    JobDone,
    JobFailed,
    JobFailure,
    JobQueue,
    JobSpec,
    Placement,
    QueueStats,
    QueueTimeout,
    Reason,
    Reclaimed,
)

W, OTHER = "worker-a", "worker-b"


class Backend(ABC):
    """Makes queues on one kind of store and closes them."""

    def __init__(self) -> None:
        self.opened: list[JobQueue] = []
        self.reclaimed: list[tuple[Reason, Reclaimed]] = []

    async def queue(self, lease_ttl_s: float = 30, max_attempts: int = 3, objectives=(None, None, None)) -> JobQueue:
        async def note(reason: Reason, what: Reclaimed) -> None:
            self.reclaimed.append((reason, what))

        queue = JobQueue(await self.store(), lease_ttl_s=lease_ttl_s, max_attempts=max_attempts, objectives=objectives,
                         on_reclaimed=note)  # fmt: skip
        await queue.start()
        self.opened.append(queue)
        return queue

    @abstractmethod
    async def store(self): ...

    async def stats(self, queue: JobQueue, key: str) -> QueueStats:
        await queue._store.upkeep()  # what the upkeep loop does every second
        return queue.stats()[key]

    async def close(self) -> None:
        for queue in self.opened:
            await queue.stop()


async def _in_line(backend: Backend, queue: JobQueue, key: str = "k") -> int:
    try:
        return (await backend.stats(queue, key)).depth
    except KeyError:  # nothing was ever queued there
        return 0


def done(rows: int, value: float = 1.0) -> JobDone:
    return JobDone(np.full((rows, 2), value, dtype=np.float32), [3] * rows)


def specs(*sizes: int, tokens: int = 0) -> list[JobSpec]:
    return [JobSpec("m", [f"text {i}" for i in range(n)], tokens=tokens, width=2) for n in sizes]  # what done() answers


async def lease(queue: JobQueue, worker: str = W, max_items: int = 10, wait_s: float = 1.0, **options):
    return await queue.lease("k", worker, max_items=max_items, wait_s=wait_s, **options)


EXPECT = Expect(max_tokens=64)


async def answer(queue: JobQueue, job, outcome, worker: str = W) -> bool:
    return (await queue.answer(worker, [(job.job_id, job.lease_id, outcome)], EXPECT)).accepted == 1


pytestmark = pytest.mark.anyio


async def test_jobs_come_back_in_order(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 2), timeout_s=5))
    jobs = await lease(queue)
    assert [len(j.inputs) for j in jobs] == [1, 2]
    # Answer out of order: the request still gets its jobs in order.
    assert await answer(queue, jobs[1], done(2, 2.0))
    assert await answer(queue, jobs[0], done(1, 1.0))
    assert [d.vectors[0, 0] for d in await run] == [1.0, 2.0]
    await backend.close()


async def test_lease_packs_jobs_up_to_max_items_but_always_one(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(5, 5, 5), timeout_s=5))
    await asyncio.sleep(0.05)
    assert [len(j.inputs) for j in await lease(queue, max_items=3, wait_s=0)] == [5]  # one, even if too big
    assert [len(j.inputs) for j in await lease(queue, max_items=10, wait_s=0)] == [5, 5]
    run.cancel()
    await backend.close()


async def test_empty_lease_waits_then_returns_nothing(backend):
    queue = await backend.queue()
    started = asyncio.get_running_loop().time()
    assert await lease(queue, wait_s=0.2) == []
    assert asyncio.get_running_loop().time() - started >= 0.19
    await backend.close()


async def test_a_waiting_lease_wakes_when_jobs_arrive(backend):
    queue = await backend.queue()
    waiting = asyncio.create_task(lease(queue, wait_s=5))
    await asyncio.sleep(0.05)
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    assert len(await asyncio.wait_for(waiting, 1)) == 1
    run.cancel()
    await backend.close()


async def test_answers_with_a_wrong_or_repeated_lease_or_from_another_worker_are_ignored(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    (job,) = await lease(queue)
    assert (await queue.answer(W, [(job.job_id, "not-the-lease", done(1))], EXPECT)).stale == 1
    assert (await queue.answer(W, [("no-such-job", job.lease_id, done(1))], EXPECT)).stale == 1
    assert not await answer(queue, job, done(1, 9.0), worker=OTHER)  # under the lease, but not its holder
    assert await queue.release(OTHER, [(job.job_id, job.lease_id)]) == 0  # nor can it give it back
    assert await answer(queue, job, done(1, 7.0))
    assert not await answer(queue, job, done(1, 8.0))  # a second answer
    assert not await answer(queue, job, JobFailed("engine_error", "late"))
    assert (await run)[0].vectors[0, 0] == 7.0
    await backend.close()


async def test_an_expired_lease_is_requeued_the_late_answer_ignored_and_its_worker_named(backend):
    queue = await backend.queue(lease_ttl_s=0.2)
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    (first,) = await lease(queue)
    (second,) = await lease(queue, worker=OTHER, wait_s=2)  # handed out again after expiry
    assert second.job_id == first.job_id and second.lease_id != first.lease_id
    assert [(reason, r.requeued, r.workers) for reason, r in backend.reclaimed] == [("expired", 1, {W})]
    assert not await answer(queue, first, done(1, 1.0))  # the slow worker comes back
    assert await answer(queue, second, done(1, 2.0), worker=OTHER)
    assert (await run)[0].vectors[0, 0] == 2.0
    await backend.close()


async def test_a_lease_lasts_what_its_worker_asks_within_the_bound(backend):
    queue = await backend.queue(lease_ttl_s=5)
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=10))
    loop = asyncio.get_running_loop()
    (first,) = await lease(queue, hold_s=1.0)
    started = loop.time()
    (second,) = await lease(queue, worker=OTHER, wait_s=4)
    assert second.job_id == first.job_id and 0.9 <= loop.time() - started < 2.5  # not the 5 s bound
    assert await answer(queue, second, done(1), worker=OTHER)
    await run
    await backend.close()


async def test_a_departed_workers_jobs_come_back_at_once_to_the_front(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 1, 1), timeout_s=5))
    held = await lease(queue, max_items=2)
    await queue.release_worker(W)
    assert backend.reclaimed[-1][0] == "departed" and backend.reclaimed[-1][1].requeued == 2
    again = await lease(queue, worker=OTHER, max_items=2, wait_s=0)
    assert [j.job_id for j in again] == [j.job_id for j in held]  # ahead of the job that waited
    assert not await answer(queue, held[0], done(1))  # the departed worker's answer is stale
    for job in again:
        assert await answer(queue, job, done(1), worker=OTHER)
    (last,) = await lease(queue, worker=OTHER, wait_s=0)
    assert await answer(queue, last, done(1), worker=OTHER)
    assert len(await run) == 3
    await backend.close()


async def test_a_job_fails_after_max_attempts_saying_why(backend):
    queue = await backend.queue(lease_ttl_s=0.1, max_attempts=2)
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    await lease(queue)
    await lease(queue)
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.failure.code == "attempts_exhausted"
    assert "2 attempts" in info.value.failure.message and "expired" in info.value.failure.message
    stats = await backend.stats(queue, "k")
    assert stats.depth == 0 and stats.leased == 0
    await backend.close()


async def test_first_failure_fails_the_request_and_withdraws_the_rest(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 1, 1), timeout_s=5))
    second = (await lease(queue, max_items=2))[1]
    assert await answer(queue, second, JobFailed("input_too_long", "too long", 0))
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.job_index == 1
    await asyncio.sleep(0.05)  # the withdrawal runs in the background
    stats = await backend.stats(queue, "k")
    assert (stats.depth, stats.leased) == (0, 0)
    await backend.close()


async def test_timeout_withdraws_queued_jobs(backend):
    queue = await backend.queue()
    with pytest.raises(QueueTimeout):
        await queue.run("k", specs(1, 1), timeout_s=0.1)
    await asyncio.sleep(0.05)
    assert (await backend.stats(queue, "k")).depth == 0
    assert await lease(queue, wait_s=0) == []
    await backend.close()


async def test_cancelled_request_leaves_nothing_behind(backend):
    """The client went away: its queued jobs are never handed to a worker."""
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 1, 1), timeout_s=5))
    (leased,) = await lease(queue, max_items=1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.sleep(0.05)
    assert await lease(queue, wait_s=0) == []
    assert not await answer(queue, leased, done(1))
    stats = await backend.stats(queue, "k")
    assert (stats.depth, stats.leased) == (0, 0)
    await backend.close()


async def test_stats_report_depth_and_age(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    stats = await backend.stats(queue, "k")
    assert stats.depth == 2 and stats.oldest_age_s >= 0.04
    run.cancel()
    await backend.close()


async def test_a_lease_takes_nothing_while_its_engine_is_busy_so_urgent_work_arriving_meanwhile_goes_first(backend):
    """Jobs are chosen when the engine can start them: a full batch waiting does not make the
    lease take it early, and an interactive job that arrives meanwhile is in the batch."""
    queue = await backend.queue()
    loop = asyncio.get_running_loop()
    flood = asyncio.create_task(queue.run("k", specs(1, 1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    started = loop.time()
    leasing = asyncio.create_task(lease(queue, max_items=2, fill_s=0.6))
    await asyncio.sleep(0.3)
    assert not leasing.done()  # a full batch waits, but the engine is busy
    urgent_spec = JobSpec("m", ["urgent"], width=2)
    urgent = asyncio.create_task(queue.run("k", [urgent_spec], 5, Placement(INTERACTIVE)))
    jobs = await asyncio.wait_for(leasing, 1)
    assert 0.55 <= loop.time() - started < 0.9
    assert [j.inputs for j in jobs][0] == ["urgent"] and len(jobs) == 2
    for task in (flood, urgent):
        task.cancel()
    await backend.close()


async def test_fill_counts_from_the_lease_call_so_a_free_engine_never_waits(backend):
    """fill_s is when the engine becomes free: a job arriving after that is taken at once, one
    arriving before it waits only for the rest of it."""
    queue = await backend.queue()
    loop = asyncio.get_running_loop()
    started = loop.time()
    late = asyncio.create_task(lease(queue, wait_s=3, fill_s=0.5))
    await asyncio.sleep(0.8)  # the engine is free by now
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    assert len(await late) == 1
    assert loop.time() - started < 1.05  # not 0.8 + another 0.5 of filling
    run.cancel()
    started = loop.time()
    early = asyncio.create_task(lease(queue, wait_s=3, fill_s=0.8))
    await asyncio.sleep(0.4)
    run = asyncio.create_task(queue.run("k", specs(1), timeout_s=5))
    assert len(await early) == 1
    assert 0.75 <= loop.time() - started < 1.0  # filled until 0.8, not until 0.4 + 0.8
    run.cancel()
    await backend.close()


async def test_a_lease_keeps_within_its_token_budget_but_takes_at_least_one_job(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(1, 1, 1, tokens=300), timeout_s=5))
    await asyncio.sleep(0.05)
    assert len(await lease(queue, wait_s=0, max_tokens=100)) == 1  # over budget, but one
    assert len(await lease(queue, wait_s=0, max_tokens=700)) == 2
    run.cancel()
    await backend.close()


OBJECTIVES = (0.1, 1.0, None)  # interactive, default, batch: the gateway's defaults
# 20 ms a call + 1.5 ms a token: 20 tokens fit in half the interactive objective, 320 in the
# default's, and a full call (20 times the fixed part) holds 253
PACE = (0.02, 0.0015)


async def test_a_call_holds_what_fits_the_objective_of_the_most_urgent_class_waiting(backend):
    queue = await backend.queue(objectives=OBJECTIVES)
    bulk = asyncio.create_task(queue.run("k", specs(*[1] * 50, tokens=30), 5, Placement(priority=BATCH)))
    await asyncio.sleep(0.05)
    assert len(await lease(queue, max_items=64, wait_s=0, pace=PACE)) == 8  # only bulk ever came: full, 253 tokens
    assert len(await lease(queue, max_items=64, wait_s=0, pace=(0.01, 0.001))) == 6  # full on a quicker engine: 190 tokens
    assert len(await lease(queue, wait_s=0)) == 10  # no pace, no bound (but max_items)
    normal = asyncio.create_task(queue.run("k", specs(1, tokens=30), 5, Placement(priority=DEFAULT)))
    await asyncio.sleep(0.05)
    [alone] = await lease(queue, max_items=64, wait_s=0, pace=PACE)  # no bulk lengthens the call it waits for
    assert alone.priority == DEFAULT
    # a default job just came: bulk calls hold what fits its objective, where that is less than full
    assert len(await lease(queue, max_items=64, wait_s=0, pace=PACE)) == 8  # 253 tokens: full is less than 320
    assert len(await lease(queue, max_items=64, wait_s=0, pace=(0.05, 0.001))) == 15  # 450 tokens, not a full 950
    urgent = asyncio.create_task(queue.run("k", specs(1, 1, 1, 1, 1, tokens=10), 5, Placement(priority=INTERACTIVE)))
    await asyncio.sleep(0.05)
    taken = await lease(queue, max_items=64, wait_s=0, pace=PACE)
    assert [job.priority for job in taken] == [INTERACTIVE] * 2 and all(job.tokens == 10 for job in taken)  # 20 tokens
    for task in (bulk, normal, urgent):
        task.cancel()
    await backend.close()


async def test_a_queue_drains_as_fast_as_its_engines_full_calls(backend):
    """The speed admission assumes before it has measured the queue: each engine's last lease,
    its pace at a call as full as its bounds let it be (inputs, tokens, ``FULL_CALL``)."""
    queue = await backend.queue()
    assert queue.speed("k") is None
    run = asyncio.create_task(queue.run("k", specs(1, 1, 1, tokens=10), timeout_s=5))
    await asyncio.sleep(0.05)
    await lease(queue, max_items=2, wait_s=0, pace=(0.5, 0.0001))  # 2 inputs of 10 tokens a call
    assert queue.speed("k") == pytest.approx(20 / (0.5 + 0.002))
    await lease(queue, "w2", max_items=64, wait_s=0, pace=(0.01, 0.001))  # a full call: 190 tokens
    assert queue.speed("k") == pytest.approx(20 / (0.5 + 0.002) + 190 / (0.01 + 0.19))
    more = asyncio.create_task(queue.run("k", specs(1, tokens=10), timeout_s=5))
    assert await lease(queue, "w3", wait_s=1)  # one that has no pace: the sum would be too low, so none
    assert queue.speed("k") is None
    await queue.release_worker("w3")
    assert queue.speed("k") == pytest.approx(20 / (0.5 + 0.002) + 190 / (0.01 + 0.19))
    run.cancel()
    more.cancel()
    await backend.close()


async def test_without_a_pace_a_token_budget_does_not_keep_classes_apart(backend):
    """Only a call bounded by an objective holds no lower class: a worker with no pace yet (or of
    protocol 2) fills its call up to its own token budget, on either store."""
    queue = await backend.queue(objectives=OBJECTIVES)
    urgent = asyncio.create_task(queue.run("k", specs(1, tokens=10), 5, Placement(priority=INTERACTIVE)))
    normal = asyncio.create_task(queue.run("k", specs(1, 1, 1, tokens=10), 5, Placement(priority=DEFAULT)))
    await asyncio.sleep(0.05)
    taken = await lease(queue, max_items=64, wait_s=0, max_tokens=100)
    assert [job.priority for job in taken] == [INTERACTIVE] + [DEFAULT] * 3
    for task in (urgent, normal):
        task.cancel()
    await backend.close()


async def test_a_more_urgent_class_without_an_objective_does_not_loosen_a_call(backend):
    queue = await backend.queue(objectives=(None, 1.0, None))
    urgent = asyncio.create_task(queue.run("k", specs(1, tokens=10), 5, Placement(priority=INTERACTIVE)))
    await asyncio.sleep(0.05)
    await lease(queue, wait_s=0)  # interactive came (it has no objective), and went
    normal = asyncio.create_task(queue.run("k", specs(*[1] * 40, tokens=30), 5, Placement(priority=DEFAULT)))
    await asyncio.sleep(0.05)
    # 50 ms a call + 1 ms a token: the default objective bounds the call to 450 tokens; a full call holds 950
    assert len(await lease(queue, max_items=64, wait_s=0, pace=(0.05, 0.001))) == 15
    for task in (urgent, normal):
        task.cancel()
    await backend.close()


async def test_a_call_that_cannot_meet_the_objective_holds_at_least_its_fixed_part_in_tokens(backend):
    """On an engine whose fixed part alone outlasts half the interactive objective, smaller calls
    would not meet it, only waste the engine on starting calls."""
    queue = await backend.queue(objectives=OBJECTIVES)
    urgent = asyncio.create_task(queue.run("k", specs(*[1] * 10, tokens=25), 5, Placement(priority=INTERACTIVE)))
    await asyncio.sleep(0.05)
    assert len(await lease(queue, max_items=64, wait_s=0, pace=(0.2, 0.001))) == 8  # 200 tokens, not 1 job
    urgent.cancel()
    await backend.close()


async def test_a_class_that_arrived_lately_bounds_the_call_though_none_of_its_jobs_waits(backend):
    """An interactive request answered a moment ago will likely have a successor while the next
    call runs: that call is as short as if it waited; without a measured pace, nothing is bounded."""
    queue = await backend.queue(objectives=OBJECTIVES)
    urgent = asyncio.create_task(queue.run("k", specs(1, tokens=10), 5, Placement(priority=INTERACTIVE)))
    [job] = await lease(queue, wait_s=1)
    assert await answer(queue, job, done(1))
    await urgent
    bulk = asyncio.create_task(queue.run("k", specs(*[1] * 40, tokens=30), 5, Placement(priority=BATCH)))
    await asyncio.sleep(0.05)
    assert len(await lease(queue, max_items=64, wait_s=0, pace=PACE)) == 1  # 20 tokens: one bulk job
    assert len(await lease(queue, max_items=64, wait_s=0)) == 39  # no pace, no bound
    bulk.cancel()
    await backend.close()


async def test_a_flooding_tenant_gets_its_share_and_no_more(backend):
    """Fair shares within a class: b's request, sent after a's flood, is leased alternately with
    a's, not after it; a's own jobs keep their order."""
    queue = await backend.queue()
    flood = asyncio.create_task(queue.run("k", specs(1, 1, 1, 1, 1, 1, tokens=10), 5, Placement(tenant="a")))
    await asyncio.sleep(0.05)
    late = asyncio.create_task(queue.run("k", specs(1, 1, 1, tokens=10), 5, Placement(tenant="b")))
    await asyncio.sleep(0.05)
    jobs = await lease(queue, max_items=9, wait_s=0)
    owner = {e.job_id: e.placement.tenant for e in queue.pending.values()}
    assert [owner[j.job_id] for j in jobs] == ["a", "b", "a", "b", "a", "b", "a", "a", "a"]
    assert [j.inputs for j in jobs if owner[j.job_id] == "a"] == [["text 0"]] * 6
    a_ids = [j.job_id for j in jobs if owner[j.job_id] == "a"]
    assert a_ids == sorted(a_ids, key=lambda j: int(j.rpartition(".")[2]))
    flood.cancel()
    late.cancel()
    await backend.close()


async def test_a_heavier_weight_gets_a_larger_share(backend):
    queue = await backend.queue()
    heavy = asyncio.create_task(queue.run("k", specs(*[1] * 6, tokens=10), 5, Placement(tenant="h", weight=2)))
    await asyncio.sleep(0.05)
    light = asyncio.create_task(queue.run("k", specs(*[1] * 6, tokens=10), 5, Placement(tenant="l")))
    await asyncio.sleep(0.05)
    jobs = await lease(queue, max_items=6, wait_s=0)
    owner = {e.job_id: e.placement.tenant for e in queue.pending.values()}
    assert [owner[j.job_id] for j in jobs].count("h") == 4  # two of every three
    heavy.cancel()
    light.cancel()
    await backend.close()


async def test_a_higher_class_goes_first_whoever_sent_more(backend):
    queue = await backend.queue()
    bulk = asyncio.create_task(queue.run("k", specs(1, 1, 1), 5, Placement(priority=BATCH, tenant="a")))
    normal = asyncio.create_task(queue.run("k", specs(1, 1), 5, Placement(priority=DEFAULT, tenant="a")))
    await asyncio.sleep(0.05)
    urgent = asyncio.create_task(queue.run("k", specs(1), 5, Placement(priority=INTERACTIVE, tenant="b")))
    await asyncio.sleep(0.05)
    order = [job.job_id for job in await lease(queue, max_items=6, wait_s=0)]
    classes = {e.job_id: e.placement.priority for e in queue.pending.values()}
    assert [classes[j] for j in order] == [INTERACTIVE, DEFAULT, DEFAULT, BATCH, BATCH, BATCH]
    for task in (bulk, normal, urgent):
        task.cancel()
    await backend.close()


async def test_an_answer_that_does_not_fit_its_job_is_refused_and_the_job_goes_back(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(2), timeout_s=5))
    (job,) = await lease(queue)
    settled = await queue.answer(W, [(job.job_id, job.lease_id, done(1))], EXPECT)  # one row for two inputs
    assert (settled.accepted, settled.refused) == (0, {job.job_id: "not one row per input, of the job's width or kind"})
    (again,) = await lease(queue, OTHER, wait_s=0)  # back in line at once
    assert again.job_id == job.job_id
    nan = JobDone(np.full((2, 2), np.nan, dtype=np.float32), [3, 3])
    assert "non-finite" in (await queue.answer(OTHER, [(again.job_id, again.lease_id, nan)], EXPECT)).refused[again.job_id]
    (third,) = await lease(queue, W, wait_s=0)
    assert await answer(queue, third, done(2, 4.0))
    assert (await run)[0].vectors[0, 0] == 4.0
    await backend.close()


async def test_a_tokenize_answer_must_carry_token_ids_and_a_detokenize_answer_texts(backend):
    queue = await backend.queue()
    nothing = np.zeros((1, 0), dtype=np.float32)
    tokenize = asyncio.create_task(queue.run("k", [JobSpec("m", ["a text"], kind="tokenize")], timeout_s=5))
    detokenize = asyncio.create_task(queue.run("k", [JobSpec("m", [[7, 8]], kind="detokenize")], timeout_s=5))
    while await _in_line(backend, queue) < 2:  # both in line: a lease takes what is there (one, on a busy CI)
        await asyncio.sleep(0.01)
    first, second = await lease(queue)
    wrong = [(first.job_id, first.lease_id, JobDone(nothing, [2], texts=["a text"])),  # texts for a tokenize job
             (second.job_id, second.lease_id, JobDone(nothing, [2]))]  # fmt: skip  # neither
    assert len((await queue.answer(W, wrong, EXPECT)).refused) == 2
    first, second = await lease(queue, OTHER, wait_s=0)
    assert await answer(queue, first, JobDone(nothing, [2], token_ids=[[7, 8]]), OTHER)
    assert await answer(queue, second, JobDone(nothing, [2], texts=["a text"]), OTHER)
    assert (await tokenize)[0].token_ids == [[7, 8]] and (await detokenize)[0].texts == ["a text"]
    await backend.close()


async def test_a_failure_naming_an_input_outside_the_job_is_refused(backend):
    queue = await backend.queue()
    run = asyncio.create_task(queue.run("k", specs(2), timeout_s=5))
    (job,) = await lease(queue)
    settled = await queue.answer(W, [(job.job_id, job.lease_id, JobFailed("input_too_long", "too long", 7))], EXPECT)
    assert settled.refused == {job.job_id: "an input index outside the job"}
    run.cancel()
    await backend.close()
