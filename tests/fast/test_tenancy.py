"""Many teams on one gateway, in process: limits and their headers, priorities, usage, the admin
API and its token, and admission by predicted wait."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import QueueLoad
from gateway.queue import BATCH, DEFAULT, INTERACTIVE, Placement
from gateway.tenancy.keys import SqliteKeyStore
from gateway.tenancy.limits import Limits, MemoryLimiter
from gateway.tenancy.usage import MemoryUsage, UsageLedger
from tests.fast.conftest import running

pytestmark = pytest.mark.anyio
ADMIN = "admin-token-for-tests"
WORKER = "worker-token-for-tests"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_requests_per_minute_slide_and_say_when_to_come_back():
    clock = Clock()
    limiter = MemoryLimiter(lapse_s=70, clock=clock)
    limits = Limits(rpm=3)
    decisions = []
    for _ in range(3):
        decisions.append(await limiter.admit("k", limits, 10))
        clock.now += 10
    assert [d.refused for d in decisions] == [None, None, None]
    assert [d.requests_remaining for d in decisions] == [2, 1, 0]
    refused = await limiter.admit("k", limits, 10)
    assert refused.refused == "rpm" and refused.retry_after_s == pytest.approx(30)  # the first leaves the window at 60 s
    clock.now += 30
    assert (await limiter.admit("k", limits, 10)).refused is None


async def test_tokens_per_minute_are_corrected_to_what_was_used_and_a_budget_ends_with_its_day():
    clock = Clock()
    limiter = MemoryLimiter(lapse_s=70, clock=clock)
    limits = Limits(tpm=100, budget=150, budget_period="day")
    first = await limiter.admit("k", limits, 90)
    assert (await limiter.admit("k", limits, 20)).refused == "tpm"
    await limiter.finish("k", limits, first, 40)  # the estimate was high
    second = await limiter.admit("k", limits, 20)
    assert second.refused is None and second.tokens_remaining == 40
    await limiter.finish("k", limits, second, 120)
    spent = await limiter.admit("k", limits, 1)
    assert spent.refused == "budget" and 0 < spent.retry_after_s <= 86400
    clock.now += 86400
    assert (await limiter.admit("k", limits, 1)).refused is None
    assert (await limiter.admit("k", limits, 101)).refused == "too_large"


async def test_concurrency_counts_requests_until_they_finish():
    limiter = MemoryLimiter(lapse_s=70)
    limits = Limits(concurrency=1)
    first = await limiter.admit("k", limits, 1)
    assert (await limiter.admit("k", limits, 1)).refused == "concurrency"
    await limiter.finish("k", limits, first, 1)
    assert (await limiter.admit("k", limits, 1)).refused is None


def _keys(tmp_path, **limits) -> tuple[str, dict[str, str]]:
    store = SqliteKeyStore(tmp_path / "keys.db")
    secret, _ = store.create("team", None, None, Limits(**limits))
    store.close()
    return secret, {"EMBEDQ_KEYS_DB": str(tmp_path / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN, "EMBEDQ_WORKER_TOKENS": WORKER}


async def test_over_its_limit_a_key_gets_429_in_each_dialects_shape_with_openais_headers(tmp_path):
    secret, env = _keys(tmp_path, rpm=2, tpm=10_000)
    auth = {"Authorization": f"Bearer {secret}"}
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)
        ok = [await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
              for _ in range(2)]  # fmt: skip
        openai = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
        ollama = await gateway.client.post("/api/embed", json={"model": "fake-model", "input": "hi"}, headers=auth)
        cohere = await gateway.client.post(
            "/v2/rerank", json={"model": "fake-model", "query": "q", "documents": ["d"]}, headers=auth
        )
    assert [r.status_code for r in ok] == [200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["1", "0"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2" and ok[0].headers["x-ratelimit-limit-tokens"] == "10000"
    assert ok[0].headers["x-ratelimit-reset-requests"] == "1m0s"
    assert int(ok[1].headers["x-ratelimit-remaining-tokens"]) < 10_000
    for response in (openai, ollama, cohere):
        assert response.status_code == 429
        assert 1 <= int(response.headers["retry-after"]) <= 60 and int(response.headers["retry-after-ms"]) <= 60_000
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = openai.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "requests per minute (2)" in error["message"]
    assert "requests per minute" in ollama.json()["error"] and "requests per minute" in cohere.json()["message"]


async def test_a_spent_budget_is_insufficient_quota_and_not_worth_retrying(tmp_path):
    secret, env = _keys(tmp_path, budget=1)
    auth = {"Authorization": f"Bearer {secret}"}
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)
        first = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
        await asyncio.sleep(0.05)  # the limiter hears of the tokens after the answer
        spent = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
    assert first.status_code == 200
    assert spent.status_code == 429 and spent.headers["x-should-retry"] == "false"
    assert spent.json()["error"]["code"] == spent.json()["error"]["type"] == "insufficient_quota"


async def test_a_spent_budget_stays_spent_across_a_restart_of_the_gateway(tmp_path):
    """A single gateway kept budgets in memory: a restart gave every key its budget again."""
    secret, env = _keys(tmp_path, budget=1)
    auth = {"Authorization": f"Bearer {secret}"}
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)
        first = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
    async with running(env) as restarted:
        await restarted.worker(token=WORKER)
        again = await restarted.client.post("/v1/embeddings", json={"model": "fake-model", "input": "hi"}, headers=auth)
    assert first.status_code == 200
    assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota", again.text


async def test_priority_is_within_what_the_key_allows(tmp_path):
    secret, env = _keys(tmp_path)
    auth = {"Authorization": f"Bearer {secret}"}
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)

        async def embed(priority):
            body = {"model": "fake-model", "input": "hi", "priority": priority}
            return await gateway.client.post("/v1/embeddings", json=body, headers=auth)

        interactive, batch, named, unknown = await embed(-1), await embed(5), await embed("batch"), await embed("urgent")
    assert interactive.status_code == 403 and interactive.json()["error"]["param"] == "priority"
    assert "'default' at most" in interactive.json()["error"]["message"]
    assert batch.status_code == named.status_code == 200
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "priority"


async def test_credentials_never_cross(tmp_path):
    secret, env = _keys(tmp_path)
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)

        async def call(method, path, token, **kwargs):
            return await gateway.client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)

        body = {"model": "fake-model", "input": "hi"}
        admin_as_client = await call("POST", "/v1/embeddings", ADMIN, json=body)
        admin_as_worker = await call("POST", "/internal/v1/workers/heartbeat", ADMIN, json={})
        client_as_admin = await call("GET", "/admin/v1/keys", secret)
        worker_as_admin = await call("GET", "/admin/v1/usage", WORKER)
        admin = await call("GET", "/admin/v1/keys", ADMIN)
    async with running({"EMBEDQ_ADMIN_TOKENS": ADMIN}) as anonymous:  # clients need no key here: tokens still do not pass
        await anonymous.worker()
        admin_as_anonymous = await anonymous.client.post(
            "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        plain = await anonymous.embed("hi")
    for refused in (admin_as_client, admin_as_worker, client_as_admin, worker_as_admin, admin_as_anonymous):
        assert refused.status_code == 401, refused.text
        assert ADMIN not in refused.text and secret not in refused.text and WORKER not in refused.text
    assert admin.status_code == 200 and plain.status_code == 200


async def test_admin_api_manages_keys_and_a_change_holds_at_the_next_request(tmp_path):
    _, env = _keys(tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)
        created = await gateway.client.post("/admin/v1/keys", json={"name": "search", "rpm": 1, "budget": "1000/day"},
                                            headers=admin)  # fmt: skip
        secret = created.json()["key"]
        auth = {"Authorization": f"Bearer {secret}"}
        body = {"model": "fake-model", "input": "hi"}
        first = await gateway.client.post("/v1/embeddings", json=body, headers=auth)
        limited = await gateway.client.post("/v1/embeddings", json=body, headers=auth)
        patched = await gateway.client.patch("/admin/v1/keys/search", json={"rpm": None}, headers=admin)
        lifted = await gateway.client.post("/v1/embeddings", json=body, headers=auth)
        listed = await gateway.client.get("/admin/v1/keys", headers=admin)
        bad = await gateway.client.patch("/admin/v1/keys/search", json={"rpm": "many"}, headers=admin)
        unknown = await gateway.client.patch("/admin/v1/keys/nobody", json={"rpm": 1}, headers=admin)
        duplicate = await gateway.client.post("/admin/v1/keys", json={"name": "search"}, headers=admin)
        revoked = await gateway.client.delete("/admin/v1/keys/search", headers=admin)
        after = await gateway.client.post("/v1/embeddings", json=body, headers=auth)
    assert created.status_code == 201 and secret.startswith("eq-")
    assert created.json()["limits"]["budget"] == 1000 and created.json()["limits"]["budget_period"] == "day"
    assert (first.status_code, limited.status_code, lifted.status_code) == (200, 429, 200)
    assert patched.json()["limits"]["rpm"] is None and patched.json()["limits"]["budget"] == 1000
    assert {k["name"] for k in listed.json()["data"]} == {"team", "search"} and secret not in listed.text
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    assert unknown.status_code == 404 and duplicate.status_code == 400
    assert revoked.json()["state"] == "revoked" and after.status_code == 401


async def test_admin_api_refuses_a_lifetime_of_nothing_or_of_millennia_and_a_scope_of_no_model(tmp_path):
    """ "0s" made a key that never expired, 99,999,999 days one that `keys list` could not show, and
    "models": [] one for every model."""
    _, env = _keys(tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with running(env) as gateway:
        answers = [await gateway.client.post("/admin/v1/keys", json={"name": f"k{i}", **body}, headers=admin)
                   for i, body in enumerate([{"expires_in": "0s"}, {"expires_in": "99999999d"}, {"models": []}])]  # fmt: skip
        narrowed = await gateway.client.patch("/admin/v1/keys/team", json={"models": []}, headers=admin)
        listed = await gateway.client.get("/admin/v1/keys", headers=admin)
    for response, field in zip([*answers, narrowed], ["expires_in", "expires_in", "models", "models"]):
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    assert {k["name"] for k in listed.json()["data"]} == {"team"}


async def test_a_usage_report_of_a_century_reads_only_the_hours_kept():
    """Each hour is a Redis read: 876,000 of them kept /health waiting 1.8 s."""
    asked: list[tuple[int, int]] = []

    class Recording(MemoryUsage):
        async def read(self, first_hour: int, last_hour: int):
            asked.append((first_hour, last_hour))
            return await super().read(first_hour, last_hour)

    now = 2_000_000_000.0
    ledger = UsageLedger(Recording(), retention_days=400, clock=lambda: now)
    await ledger.report(now - 100 * 365 * 86400, now + 100 * 365 * 86400)
    [(first, last)] = asked
    assert (last - first) / 3600 <= 401 * 24


async def test_usage_adds_up_to_what_clients_were_told_and_survives_a_restart(tmp_path):
    secret, env = _keys(tmp_path, rpm=3)
    auth = {"Authorization": f"Bearer {secret}"}
    told = 0
    async with running(env) as gateway:
        await gateway.worker(token=WORKER)
        for texts in (["a b c"], ["one", "two"], ["x"]):
            response = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": texts}, headers=auth)
            told += response.json()["usage"]["prompt_tokens"]
        limited = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "x"}, headers=auth)
        unknown = await gateway.client.post("/v1/embeddings", json={"model": "nope", "input": "x"}, headers=auth)
    assert limited.status_code == 429 and unknown.status_code == 404
    async with running(env) as restarted:
        report = await restarted.client.get("/admin/v1/usage", params={"by": "key"}, headers={"Authorization": f"Bearer {ADMIN}"})
        by_model = await restarted.client.get("/admin/v1/usage", params={"by": "model", "granularity": "day"},
                                              headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
    [row] = report.json()["data"]
    assert row["key"] == "team" and row["prompt_tokens"] == told and told > 0
    assert row["requests"] == 5 and row["inputs"] == 4 and row["rejected"] == 1
    assert row["errors"] == {"rate_limit_exceeded": 1, "model_not_found": 1}
    assert {r["model"]: r["prompt_tokens"] for r in by_model.json()["data"]}["fake-model"] == told


def test_an_unmeasured_queue_predicts_waits_from_its_engines_speed():
    """A wave that fills the queue at once is admitted only as far as the engines' reported speed
    drains it in time; a request that finds nothing waiting waits for nothing, whatever its size
    (its own work counts only against the timeout)."""
    load = QueueLoad()
    assert load.predicted_s(Placement(DEFAULT, "a"), 5000, 100.0, prior=100.0) == (0, 50)  # nothing waits
    load.enter(Placement(DEFAULT, "a"), 1000, 100.0)
    assert load.rate(100.5) is None
    assert load.predicted_s(Placement(DEFAULT, "a"), 500, 100.5, prior=100.0) == pytest.approx((10, 5))
    assert load.predicted_s(Placement(DEFAULT, "a"), 500, 100.5) is None  # no engine has said: admitted


def test_predicted_wait_puts_higher_classes_first_and_caps_other_tenants_at_their_share():
    load = QueueLoad()
    load.enter(Placement(DEFAULT, "flood"), 1000, 101.0)  # keeps the queue backlogged
    for i in range(20):  # 20 answers of 10 tokens in the 2 s since: 100 tokens/s while backlogged
        load.enter(Placement(DEFAULT, "a"), 10, 101.0 + i * 0.05)
        load.leave(Placement(DEFAULT, "a"), 10, 101.0 + i * 0.05 + 0.01, answered=True)
    now = 103.0
    assert load.rate(now) is not None
    flood_wait, light_wait, urgent_wait, batch_wait = (
        sum(load.predicted_s(placement, 100, now) or (0,))
        for placement in (Placement(DEFAULT, "flood"), Placement(DEFAULT, "light"), Placement(INTERACTIVE, "light"),
                          Placement(BATCH, "light"))
    )  # fmt: skip
    assert flood_wait and light_wait and urgent_wait and batch_wait
    assert urgent_wait < light_wait < flood_wait <= batch_wait  # batch: after all the default class
    assert light_wait == pytest.approx(flood_wait * 200 / 1100, rel=0.01)  # its 100, and as much of the flood's
