"""The queue core's promises on a real Redis (the cases are in ``tests/queue_cases.py``; the fast
tier runs the same ones on the memory store), then Redis's own: several replicas on one Redis,
and what a Redis that lost writes or a replica that died leaves behind."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis

from gateway.queue import JobFailed, JobFailure, JobQueue, RedisStore
from gateway.redis_link import RedisLink
from gateway.tenancy.usage import RedisUsage, UsageLedger
from tests.queue_cases import *  # noqa: F403  (the cases, collected here)
from tests.queue_cases import OTHER, Backend, W, answer, done, lease, specs


class RedisBackend(Backend):
    """Queues on one Redis, sharing a key prefix: replicas of one gateway."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.prefix = "unit-" + uuid.uuid4().hex[:8]
        self.links: list[RedisLink] = []

    async def store(self) -> RedisStore:
        link = RedisLink(self.url, None, self.prefix)
        await link.start()
        self.links.append(link)
        return RedisStore(link)

    async def close(self) -> None:
        await super().close()
        for link in self.links:
            await link.stop()


@pytest.fixture
def backend(redis_server) -> RedisBackend:
    return RedisBackend(redis_server.url)


async def test_a_replica_whose_clock_runs_an_hour_ahead_expires_no_lease(backend, monkeypatch):
    """Leases are timed by Redis's clock: a replica's own, wrong by an hour, expired every lease."""
    taker, ahead = await backend.queue(lease_ttl_s=30), await backend.queue(lease_ttl_s=30)
    run = asyncio.create_task(taker.run("k", specs(1), timeout_s=5))
    (job,) = await lease(taker)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert (await ahead._store.expire()).requeued == 0  # what the upkeep loop does every second
    monkeypatch.setattr(time, "time", real)
    assert await answer(taker, job, done(1, 5.0))
    assert (await run)[0].vectors[0, 0] == 5.0
    await backend.close()


async def test_a_job_queued_on_one_replica_is_answered_through_another(backend):
    owner, other = await backend.queue(), await backend.queue()
    run = asyncio.create_task(owner.run("k", specs(2, 1), timeout_s=5))
    first, second = await lease(other)
    assert await answer(other, first, done(2, 3.0))
    assert await answer(other, second, done(1, 4.0))
    results = await run
    assert [d.vectors[0, 0] for d in results] == [3.0, 4.0] and results[0].prompt_tokens == [3, 3]
    failing = asyncio.create_task(owner.run("k", specs(1), timeout_s=5))
    (job,) = await lease(other)
    assert await answer(other, job, JobFailed("input_too_long", "input too long", 0))
    with pytest.raises(JobFailure) as info:
        await failing
    assert (info.value.failure.code, info.value.failure.input_index) == ("input_too_long", 0)
    await backend.close()


async def test_an_exhausted_job_of_another_replica_is_failed_for_its_client(backend):
    owner, other = await backend.queue(lease_ttl_s=0.1, max_attempts=1), await backend.queue(lease_ttl_s=0.1, max_attempts=1)
    run = asyncio.create_task(owner.run("k", specs(1), timeout_s=5))
    await lease(other)  # and never answered: the sweep of either replica fails it for its owner
    with pytest.raises(JobFailure) as info:
        await run
    assert info.value.failure.code == "attempts_exhausted" and "1 attempts" in info.value.failure.message
    await backend.close()


async def test_concurrent_leases_on_two_replicas_never_share_a_job(backend):
    a, b = await backend.queue(), await backend.queue()
    runs = [asyncio.create_task(q.run("k", specs(*[1] * 25), timeout_s=10)) for q in (a, b, a, b)]
    seen: list[str] = []

    async def worker(queue: JobQueue, name: str) -> None:
        while len(seen) < 100:
            for job in await lease(queue, name, max_items=3, wait_s=0.2):
                seen.append(job.job_id)
                assert await answer(queue, job, done(1), worker=name)

    await asyncio.wait_for(asyncio.gather(*(worker(q, f"w{i}") for i, q in enumerate((a, b, a, b)))), 10)
    assert len(seen) == 100 and len(set(seen)) == 100
    await asyncio.gather(*runs)
    await backend.close()


async def test_an_expired_lease_is_reclaimed_whichever_replica_looks(backend):
    owner = await backend.queue(lease_ttl_s=0.3)
    other = await backend.queue(lease_ttl_s=0.3)
    run = asyncio.create_task(owner.run("k", specs(1), timeout_s=5))
    (lost,) = await lease(other)  # its worker dies with it
    (again,) = await lease(other, OTHER, wait_s=2)
    assert again.job_id == lost.job_id
    assert not await answer(owner, lost, done(1, 1.0))
    assert await answer(owner, again, done(1, 2.0), worker=OTHER)
    assert (await run)[0].vectors[0, 0] == 2.0
    await backend.close()


async def test_a_departed_worker_is_released_by_any_replica(backend):
    owner, other = await backend.queue(), await backend.queue()
    run = asyncio.create_task(owner.run("k", specs(1), timeout_s=5))
    (held,) = await lease(owner, W)
    await other.release_worker(W)
    (again,) = await lease(owner, OTHER, wait_s=0)
    assert again.job_id == held.job_id
    assert await answer(other, again, done(1, 6.0), worker=OTHER)
    assert (await run)[0].vectors[0, 0] == 6.0
    await backend.close()


async def test_the_jobs_of_a_dead_replica_are_dropped_not_computed(backend, redis_server):
    doomed, survivor = await backend.queue(), await backend.queue()
    run = asyncio.create_task(doomed.run("k", specs(1, 1), timeout_s=5))
    await asyncio.sleep(0.05)
    raw = Redis.from_url(redis_server.url)
    doomed_link = backend.links[0]
    for task in doomed_link._tasks:  # it stops refreshing its liveness key, as a killed process would
        task.cancel()
    await raw.delete(f"{backend.prefix}:alive:{doomed_link.replica}")
    assert await lease(survivor, wait_s=0.2) == []
    assert await raw.zcard(f"{backend.prefix}:q:k:1") == 0
    assert not await raw.keys(f"{backend.prefix}:j:*")
    run.cancel()
    await raw.aclose()
    await backend.close()


async def test_a_job_that_redis_lost_is_queued_again_by_its_owner(backend, redis_server):
    owner = await backend.queue()
    run = asyncio.create_task(owner.run("k", specs(1), timeout_s=5))
    await asyncio.sleep(0.05)
    raw = Redis.from_url(redis_server.url)
    lost = [f"{backend.prefix}:q:k:1", *await raw.keys(f"{backend.prefix}:j:*")]
    await raw.delete(*lost)  # as a restart without its last writes
    assert await lease(owner, wait_s=0) == []
    await owner._store.upkeep()
    await owner._store.upkeep()  # gone on two checks: queued again
    (job,) = await lease(owner)
    assert await answer(owner, job, done(1, 5.0))
    assert (await run)[0].vectors[0, 0] == 5.0
    await raw.aclose()
    await backend.close()


class ReplyLosingProxy:
    """TCP to Redis that, once armed, lets the next command through and then hangs up instead of
    passing its reply on: a network cut after Redis ran the command."""

    def __init__(self, redis_port: int):
        self.redis_port, self.armed, self.port = redis_port, False, 0

    async def start(self) -> ReplyLosingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        lose_reply = asyncio.Event()

        async def up() -> None:
            while data := await client_r.read(65536):
                if self.armed:
                    self.armed = False
                    lose_reply.set()
                redis_w.write(data)
                await redis_w.drain()

        async def down() -> None:
            while data := await redis_r.read(65536):
                if lose_reply.is_set():
                    return  # Redis ran it; the client never hears
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        client_w.close()
        redis_w.close()

    async def stop(self) -> None:
        self.server.close()


async def test_usage_whose_reply_was_lost_is_counted_once(redis_server):
    """redis-py retried any command on a broken connection (a LEASE, an ANSWER, usage's HINCRBY),
    and the ledger sent a failed flush again: usage counted twice, or three times."""
    proxy = await ReplyLosingProxy(int(redis_server.url.rsplit(":", 1)[1].split("/")[0])).start()
    link = RedisLink(f"redis://127.0.0.1:{proxy.port}/0", None, "lost-" + uuid.uuid4().hex[:8])
    now = time.time()
    ledger = UsageLedger(RedisUsage(link, 3600), retention_days=1, clock=lambda: now)
    try:
        await link.redis.ping()  # connected, through the proxy
        ledger.record("team", "m", tokens=7)
        proxy.armed = True
        await ledger.flush()  # Redis adds it; its answer is lost: kept, to be sent again
        await ledger.flush()
        [row] = await ledger.report(now - 3600, now + 1)
    finally:
        await link.redis.aclose()
        await proxy.stop()
    assert row["prompt_tokens"] == 7 and row["requests"] == 1, row
