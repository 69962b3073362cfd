"""Many teams on one fleet, with real processes on default settings: fair shares under a flood,
priorities, overload shed early, per-key limits across replicas, and usage that adds up."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid

import httpx
import openai
import pytest

from bench.fairness import light_beside_flood
from gateway.tenancy import keys as keys_module
from tests.system.conftest import Cluster, Gateway, fake_worker_config
from tests.system.load import DIMS, MODEL, open_loop, percentile

pytestmark = pytest.mark.timeout(300)
ADMIN = "admin-token-for-system-tests"
BODY = {"model": MODEL, "input": "a text"}


def tenancy_gateway(cluster: Cluster, env: dict[str, str] | None = None) -> Gateway:
    """A gateway on default settings, with keys (SQLite, or Redis with the Redis queue) and an admin token."""
    keys = {"EMBEDQ_KEYS_REDIS": "true"} if cluster.redis else {"EMBEDQ_KEYS_DB": str(cluster.tmp / "keys.db")}
    return cluster.gateway(env={**keys, "EMBEDQ_ADMIN_TOKENS": ADMIN, **(env or {})}, defaults=True)


def create_key(gateway: Gateway, name: str, **limits) -> str:
    response = httpx.post(gateway.url + "/admin/v1/keys", json={"name": name, **limits}, headers=auth(ADMIN))
    assert response.status_code == 201, response.text
    return response.json()["key"]


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def slow_worker(cluster: Cluster, gateway: Gateway, delay_s: float, max_num_seqs: int) -> None:
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=delay_s, max_num_seqs=max_num_seqs))
    gateway.wait_for_model(MODEL)


@pytest.mark.parametrize("queue_backend", ["memory", "redis"])
def test_a_flooding_key_gets_its_share_and_a_light_key_keeps_its_latency(cluster: Cluster, queue_backend: str):
    """One fake worker at its default, real-shaped cost; key A floods it with 32 clients of 16
    long texts, key B sends 2 short requests a second, both interactive. B waits for a call sized
    to the interactive objective (0.1 s: calls of 50 ms), not for a full one of A's."""
    gateway = tenancy_gateway(cluster)
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, max_model_len=256))
    gateway.wait_for_model(MODEL)
    figures = asyncio.run(light_beside_flood(gateway.url, MODEL, ADMIN, seconds=12))
    summary = f"{queue_backend}: {figures.summary()}"
    print(summary)
    assert set(figures.light_statuses) == {200}, summary
    assert set(figures.flood_statuses) <= {200, 429} and figures.flood_inputs_per_s > 50, summary  # its share; no 5xx
    # Measured here: B's p99 plus 0.03-0.13 s beside the flood. With calls as full as the engine
    # takes (before the objectives), B waited for 64 of A's texts: about 0.6 s a call.
    assert figures.p99_added_s <= 0.1 + 0.2, summary


def test_an_interactive_request_overtakes_a_saturated_queue(cluster: Cluster):
    gateway = cluster.gateway(defaults=True)
    slow_worker(cluster, gateway, delay_s=0.2, max_num_seqs=2)
    urgent = {**BODY, "priority": "interactive"}

    async def sequential(count: int, start_after_s: float) -> list[float]:
        await asyncio.sleep(start_after_s)
        latencies = []
        for _ in range(count):
            [(status, seconds)] = await open_loop(gateway.url, 1, 1, urgent)
            assert status == 200
            latencies.append(seconds)
            await asyncio.sleep(0.3)
        return latencies

    idle = asyncio.run(sequential(10, 0))

    async def saturated():
        flood = asyncio.create_task(open_loop(gateway.url, 30, 15, BODY))
        latencies = await sequential(15, 3)
        statuses = {status for status, _ in await flood}
        return latencies, statuses

    busy, statuses = asyncio.run(saturated())
    summary = f"interactive p50 idle {percentile(idle, 0.5) * 1000:.0f} ms, saturated {percentile(busy, 0.5) * 1000:.0f} ms"
    print(summary)
    assert statuses <= {200, 429}, summary
    assert percentile(busy, 0.5) <= percentile(idle, 0.5) + 0.2 + 0.02, summary  # one batch time plus 20 ms


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_overload_on_defaults_is_shed_early_and_service_returns_at_once(cluster: Cluster):
    """5x the capacity of a slow worker (0.5 s a batch of 4: 8 requests/s) for 60 s."""
    gateway = cluster.gateway(defaults=True)
    slow_worker(cluster, gateway, delay_s=0.5, max_num_seqs=4)
    rss: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1):
            rss.append(_rss_mb(gateway.proc.popen.pid))

    threading.Thread(target=watch, daemon=True).start()

    async def overload_then_probe():
        load = asyncio.create_task(open_loop(gateway.url, 40, 60, BODY))
        await asyncio.sleep(60)
        probes = []
        for _ in range(20):  # from the moment the load stops
            probes.extend(await open_loop(gateway.url, 1, 1, BODY))
            await asyncio.sleep(0.5)
        return await load, probes

    outcomes, probes = asyncio.run(overload_then_probe())
    stop.set()
    served = [s for status, s in outcomes if status == 200]
    refused = [s for status, s in outcomes if status == 429]
    summary = (
        f"{len(outcomes)} requests: {len(served)} served "
        f"(p50 {percentile(served, 0.5):.1f}s, p99 {percentile(served, 0.99):.1f}s), "
        f"{len(refused)} 429s (p99 {percentile(refused, 0.99) * 1000:.0f} ms); gateway RSS max {max(rss):.0f} MB; "
        f"probes after the load: {[round(s, 1) for _, s in probes]}"
    )
    print(summary)
    assert {status for status, _ in outcomes} == {200, 429}, summary  # no 504, no 5xx
    # Refused at once, not after waiting in line (up to max_queue_wait_s, 10 s): 7 ms here at p99,
    # 127 ms once on a loaded CI machine.
    assert percentile(refused, 0.99) < 0.5, summary
    assert percentile(served, 0.99) < 60, summary
    assert max(rss) < 400, summary
    # Right after the load, the queue still holds up to max_queue_wait_s of work: a probe is
    # refused at once or served within it; once that is drained, full service.
    assert {status for status, _ in probes} <= {200, 429} and all(seconds < 12 for _, seconds in probes), summary
    assert all(status == 200 and seconds < 2 for status, seconds in probes[-6:]), summary


@pytest.fixture
def queue_backend() -> str:
    return "redis"


def test_requests_per_minute_hold_across_two_replicas(cluster: Cluster):
    """--rpm 120, driven at 5 requests/s for 60 s, half through each replica."""
    a, b = tenancy_gateway(cluster), tenancy_gateway(cluster)
    secret = create_key(a, "metered", rpm=120)
    slow_worker(cluster, a, delay_s=0.01, max_num_seqs=8)
    b.wait_for_model(MODEL)

    async def both():
        return await asyncio.gather(*(open_loop_with_headers(g.url, 2.5, 60, auth(secret)) for g in (a, b)))

    results = [r for replica in asyncio.run(both()) for r in replica]
    accepted = [r for r in results if r[0] == 200]
    remaining = sorted(int(r[1]) for r in accepted)
    summary = f"{len(results)} sent, {len(accepted)} accepted; remaining seen {remaining[:3]}...{remaining[-3:]}"
    print(summary)
    assert 117 <= len(accepted) <= 123, summary
    assert len(set(remaining)) >= 117 and remaining[0] == 0 and remaining[-1] == 119, summary  # counted down, once each
    assert {r[0] for r in results} == {200, 429}, summary


async def open_loop_with_headers(url: str, rate: float, duration_s: float, headers: dict) -> list[tuple[int, str]]:
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def one(n: int) -> tuple[int, str]:
            response = await client.post("/v1/embeddings", json={**BODY, "input": f"text {n}"})
            return response.status_code, response.headers.get("x-ratelimit-remaining-requests", "-1")

        tasks = []
        for n in range(int(rate * duration_s)):
            tasks.append(asyncio.create_task(one(n)))
            await asyncio.sleep(1 / rate)
        return list(await asyncio.gather(*tasks))


def test_the_openai_client_retries_through_a_limit_by_its_retry_after(cluster: Cluster):
    gateway = tenancy_gateway(cluster)
    secret = create_key(gateway, "one-at-a-time", concurrency=1)
    slow_worker(cluster, gateway, delay_s=0.5, max_num_seqs=1)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=4)
    results: list[int] = []

    def embed(n: int) -> None:
        results.append(len(client.embeddings.create(model=MODEL, input=f"text {n}").data))

    threads = [threading.Thread(target=embed, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    usage = httpx.get(gateway.url + "/admin/v1/usage", headers=auth(ADMIN)).json()["data"]
    assert results == [1, 1, 1]
    assert usage[0]["rejected"] >= 1 and usage[0]["requests"] == 3 + usage[0]["rejected"]


def test_usage_equals_what_clients_were_told_across_replicas_and_a_restart(cluster: Cluster):
    a, b = tenancy_gateway(cluster), tenancy_gateway(cluster)
    keys = {name: create_key(a, name, **limits) for name, limits in (("alpha", {}), ("beta", {"rpm": 4}), ("gamma", {}))}
    slow_worker(cluster, a, delay_s=0.01, max_num_seqs=8)
    b.wait_for_model(MODEL)
    told = dict.fromkeys(keys, 0)
    statuses = []
    for round_ in range(3):
        for name, secret in keys.items():
            for gateway in (a, b):
                texts = [f"{name} {round_} {i} " * (i + 1) for i in range(round_ + 1)]
                openai_reply = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": texts},
                                          headers=auth(secret))  # fmt: skip
                ollama_reply = httpx.post(gateway.url + "/api/embed", json={"model": MODEL, "input": texts}, headers=auth(secret))
                bad = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": []}, headers=auth(secret))
                statuses += [openai_reply.status_code, ollama_reply.status_code, bad.status_code]
                if openai_reply.status_code == 200:
                    told[name] += openai_reply.json()["usage"]["prompt_tokens"]
                if ollama_reply.status_code == 200:
                    told[name] += ollama_reply.json()["prompt_eval_count"]
    assert set(statuses) == {200, 400, 429}
    a.proc.stop(signal.SIGTERM)
    b.proc.stop(signal.SIGTERM)
    restarted = tenancy_gateway(cluster)
    rows = httpx.get(restarted.url + "/admin/v1/usage", params={"by": "key", "granularity": "day"}, headers=auth(ADMIN)).json()
    tokens = {row["key"]: row["prompt_tokens"] for row in rows["data"]}
    assert tokens == told, (tokens, told)
    beta = next(row for row in rows["data"] if row["key"] == "beta")
    assert beta["rejected"] > 0 and beta["errors"]["invalid_value"] > 0
    assert ADMIN not in cluster.logs() and not any(secret in cluster.logs() for secret in keys.values())
    assert os.environ.get("EMBEDQ_ADMIN_TOKENS") is None  # the tests' own environment holds no secret


def test_a_limit_change_racing_a_revocation_never_revives_the_key(redis_server, monkeypatch):
    """Two replicas: one PATCHes a key's rpm while the other revokes it, between the first's read
    and its write (the race made here, inside the change). The revocation holds."""
    prefix = "race-" + uuid.uuid4().hex[:8]
    patching, revoking = (keys_module.RedisKeyStore(redis_server.url, None, prefix) for _ in range(2))
    patching.create("team", None, None)
    real, raced = keys_module.changed, []

    def changed_meanwhile(key, changes):
        if not raced:
            raced.append(True)
            revoking.revoke("team")  # lands after the PATCH read the key, before it writes
        return real(key, changes)

    monkeypatch.setattr(keys_module, "changed", changed_meanwhile)
    patched = patching.update("team", rpm=5)
    after = revoking.get("team")
    assert after.revoked_at is not None and not after.usable(after.created_at + 1), after
    assert after.limits.rpm == 5 and patched.revoked_at is not None  # both changes hold
