"""Leases follow their worker, in process: a worker that vanishes, leaves, or hangs gives its jobs
back long before its clients give up. (The system tier shows the same with real processes, kill
-9 and SIGSTOP, on default settings; here the worker TTL is short to keep the tier fast.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.fakes import expected, metric
from tests.fast.conftest import Gateway, HandWorker, running
from worker.pace import HOLD_MARGIN_S, HOLD_SLACK, EnginePace

pytestmark = pytest.mark.anyio


async def _load(gateway: Gateway, clients: int, requests_each: int) -> list[tuple[int, float, bool]]:
    """(status, seconds, vectors right) per request."""
    loop = asyncio.get_running_loop()

    async def client(c: int) -> list[tuple[int, float, bool]]:
        outcomes = []
        for n in range(requests_each):
            texts = [f"client {c} request {n} input {i}" for i in range(3)]
            started = loop.time()
            response = await gateway.embed(texts)
            right = response.status_code == 200 and np.array_equal(
                np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32), expected(texts)
            )
            outcomes.append((response.status_code, loop.time() - started, right))
        return outcomes

    return [o for outcomes in await asyncio.gather(*(client(c) for c in range(clients))) for o in outcomes]


async def test_a_vanished_workers_jobs_are_answered_by_another_once_the_registry_drops_it():
    async with running({"EMBEDQ_WORKER_TTL_S": "1"}) as gateway:
        victim = await gateway.worker(delay_s=0.5, max_num_seqs=4)
        await gateway.worker(delay_s=0.05, max_num_seqs=4)
        load = asyncio.create_task(_load(gateway, clients=16, requests_each=5))
        # Killed mid-call: jobs it had only just been handed when killed go back at once, not as departed.
        busy = lambda: victim.engine.started and victim.id in gateway.app.state.queue._store._held  # noqa: E731
        await gateway.until(busy, "the victim to be running jobs")
        await victim.kill()
        outcomes = await load
        metrics = await gateway.metrics()
    departed = metric(metrics, 'embedq_gateway_leases_reclaimed_total{action="requeued",reason="departed"}')
    slowest = max(seconds for _, seconds, _ in outcomes)
    summary = f"{len(outcomes)} requests, slowest {slowest:.2f}s, {departed:g} jobs back in line"
    assert all(status == 200 and right for status, _, right in outcomes), summary
    assert departed >= 1, summary
    assert slowest < 1 + 2, summary  # the TTL, then recomputed: not a lease expiring


async def test_a_leaving_workers_leases_go_back_at_once():
    async with running() as gateway:
        leaving = HandWorker(gateway, "w-leaving")
        await leaving.register()
        request = asyncio.create_task(gateway.embed(["held, then given up"]))
        assert len(await leaving.lease(hold_s=30)) == 1
        await gateway.worker()  # a healthy worker, for when the job comes back
        await leaving.call("/workers/leave", json={"worker_id": "w-leaving"})
        response = await asyncio.wait_for(request, 3)  # not the 30 s of its lease
    assert response.status_code == 200


async def test_a_worker_that_hangs_up_mid_poll_takes_no_job_for_nobody():
    """Its lease was left running after the hang-up and took the next job, which then waited for
    the lease to expire (30.7 s in a probe); a healthy worker answers it at once now."""
    async with running() as gateway:
        gone = HandWorker(gateway, "w-gone")
        await gone.register()
        poll = asyncio.create_task(gone.lease(wait_s=20, hold_s=30))
        await asyncio.sleep(0.2)  # the poll is waiting in the queue
        poll.cancel()  # the worker hangs up
        await asyncio.sleep(0.05)
        await gateway.worker()
        response = await asyncio.wait_for(gateway.embed(["after the hang-up"]), 3)
    assert response.status_code == 200


async def test_a_worker_whose_engine_hangs_loses_its_jobs_and_sits_out():
    async with running() as gateway:
        hung = await gateway.worker(delay_s=0.05, generator_extra="hang_after_batches = 3")
        warm = await _load(gateway, clients=1, requests_each=3)  # measured: its leases are sized from now on
        assert all(status == 200 for status, _, _ in warm)
        await gateway.worker(delay_s=0.05)
        outcomes = await _load(gateway, clients=8, requests_each=4)
        models = (await gateway.client.get("/v1/models")).json()
        stuck = gateway.app.state.workers.state(hung.id) == "stuck"
        metrics = await gateway.metrics()
        hung.engine.close()  # lets its thread end
    expired = metric(metrics, 'embedq_gateway_leases_reclaimed_total{action="requeued",reason="expired"}')
    slowest = max(seconds for _, seconds, _ in outcomes)
    summary = f"{len(outcomes)} requests, slowest {slowest:.2f}s, {expired:g} expired leases requeued"
    assert all(status == 200 and right for status, _, right in outcomes), summary
    assert expired >= 1 and stuck, summary
    assert slowest < HOLD_SLACK * 0.3 + HOLD_MARGIN_S + 3, summary  # its own measured pace, not the 30 s bound
    assert [m["id"] for m in models["data"]] == ["fake-model"]  # still served, by the other worker


def test_the_pace_is_unknown_until_measured_then_covers_a_full_batch():
    pace = EnginePace(max_lease_tokens=1000)
    assert pace.hold_s() is None and pace.fill_s() == 0.0
    for tokens, seconds in ((100, 0.11), (500, 0.15), (1000, 0.2)):  # 0.1 s a call + 0.1 ms a token
        pace._recent.append((tokens, seconds))
    assert pace.pessimistic_s(1000) == pytest.approx(0.2, abs=0.02)
    assert pace.hold_s() == pytest.approx(HOLD_SLACK * pace.pessimistic_s(1000) + HOLD_MARGIN_S)


def test_a_tiny_batch_with_a_hiccup_does_not_blow_up_the_prediction():
    pace = EnginePace(max_lease_tokens=16384)
    for tokens, seconds in ((10, 0.01), (8, 0.5), (12000, 2.4)):  # a 0.5 s pause on 8 tokens
        pace._recent.append((tokens, seconds))
    assert pace.pessimistic_s(16384) < 10


def test_the_fit_finds_the_fixed_and_the_per_token_part_of_an_engine_call():
    pace = EnginePace(max_lease_tokens=4096)
    assert pace.fit() is None
    for tokens in (43, 360, 2750, 700, 90, 1400):  # the fake engine's default cost: 7 ms a call + 0.05 ms a token
        pace._recent.append((tokens, 0.007 + 0.00005 * tokens))
    call_s, token_s = pace.fit()  # type: ignore[misc]
    assert call_s == pytest.approx(0.007, rel=1e-6) and token_s == pytest.approx(0.00005, rel=1e-6)
    pace._recent = type(pace._recent)([(500, 0.032)] * 8, maxlen=32)  # one size: the last fixed part
    assert pace.fit() == (pytest.approx(0.007), pytest.approx(0.025 / 500))
    pace = EnginePace(max_lease_tokens=4096)
    pace._recent.extend([(5, 0.51)] * 8)  # never measured: all of it per token
    assert pace.fit() == (0.0, pytest.approx(0.51 / 5))
    pace = EnginePace(max_lease_tokens=4096, call_s=0.5)  # one short input took 0.5 s at load
    pace._recent.extend([(5, 0.51)] * 8)  # a slow engine's calls: nearly all fixed part
    assert pace.fit() == (0.5, pytest.approx(0.01 / 5))


def test_a_call_unlike_the_recent_ones_is_not_predicted_long_so_no_lease_waits_on_an_idle_engine():
    """Recent calls all of 4 tokens (25 ms) cannot tell what 236 tokens take; taken as all per
    token, the guess was 1.5 s, and the next lease waited a second while the engine idled."""
    pace = EnginePace(max_lease_tokens=4096)
    pace._recent.extend([(4, 0.025)] * 8)
    pace.started(236)
    assert pace.fill_s() <= 0.025
    pace._recent.extend([(4, 0.025), (236, 0.115), (8, 0.03)])
    pace.started(200)
    assert 0.08 < pace.fill_s() <= 0.11  # the fit, where calls of about this size were measured
