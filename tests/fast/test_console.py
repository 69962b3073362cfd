"""The web console in process: sign-in and its cookie, CSRF, the headers, credentials that do
not cross, and the data its pages draw (the fleet, the last hour, the playground, usage as CSV).
The pages themselves run in a real browser in tests/system/test_console.py."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from tests.fast.conftest import URL, Gateway, HandWorker, running

pytestmark = pytest.mark.anyio
ADMIN = "admin-token-for-console-tests"
SETTINGS = {"EMBEDQ_ADMIN_TOKENS": ADMIN}
PAGES = ["/ui/"]
DATA = ["/ui/api/session", "/ui/api/fleet", "/ui/api/activity", "/ui/api/keys", "/ui/api/usage", "/ui/api/batches",
        "/ui/api/files/file-x/content"]  # fmt: skip
CHANGES = [("POST", "/ui/api/keys"), ("PATCH", "/ui/api/keys/k"), ("DELETE", "/ui/api/keys/k"), ("POST", "/ui/api/embed"),
           ("POST", "/ui/api/batches/batch_x/cancel"), ("POST", "/ui/logout")]  # fmt: skip


def _new_client(gateway: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL)


async def sign_in(client: httpx.AsyncClient, token: str = ADMIN) -> httpx.Response:
    return await client.post("/ui/login", data={"token": token})


async def csrf(client: httpx.AsyncClient) -> dict[str, str]:
    return {"X-CSRF-Token": (await client.get("/ui/api/session")).json()["csrf"]}


async def test_nothing_opens_without_a_session_and_a_wrong_token_opens_none(tmp_path):
    async with running({**SETTINGS, "EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        client = gateway.client
        for path in PAGES:
            page = await client.get(path)
            assert page.status_code == 303 and page.headers["location"] == "/ui/login", path
        for path in DATA:
            assert (await client.get(path)).status_code == 401, path
        for method, path in CHANGES:
            assert (await client.request(method, path, json={})).status_code == 401, (method, path)
        for token in ("", "not-it", "worker-token"):
            refused = await sign_in(client, token)
            assert refused.status_code == 401 and "not an admin token" in refused.text
            assert "set-cookie" not in refused.headers
        created = await client.post("/admin/v1/keys", json={"name": "team"}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert (await sign_in(client, created.json()["key"])).status_code == 401  # a client key is no admin token
        assert (await client.get("/ui/api/fleet")).status_code == 401


async def test_sign_in_sets_a_strict_cookie_and_every_answer_a_strict_policy():
    async with running(SETTINGS) as gateway:
        client = gateway.client
        form = await client.get("/ui/login")
        assert form.status_code == 200 and "<script" not in form.text  # the form works without script
        signed = await sign_in(client)
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and "Secure" not in cookie
        assert ADMIN not in cookie
        for path in [*PAGES, *DATA[:3], "/ui/login", "/ui/static/app.js"]:
            answer = await client.get(path)
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy, path
            assert "frame-ancestors 'none'" in policy and answer.headers["x-frame-options"] == "DENY", path
        shell = await client.get("/ui/")
        assert shell.status_code == 200 and not re.search(r"<script(?![^>]*\bsrc=)", shell.text)  # no inline script
        assert (await client.get("/ui/static/../app.py")).status_code == 404
        over_tls = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url="https://127.0.0.1:8080")
        async with over_tls:
            assert "Secure" in (await sign_in(over_tls)).headers["set-cookie"]
        behind_an_ingress = await client.post("/ui/login", data={"token": ADMIN}, headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in behind_an_ingress.headers["set-cookie"]


async def test_changes_need_the_csrf_token_and_sign_out_ends_the_session(tmp_path):
    async with running({**SETTINGS, "EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        client = gateway.client
        await sign_in(client)
        refused = await client.post("/ui/api/keys", json={"name": "no-csrf"})
        assert refused.status_code == 401 and "CSRF" in refused.json()["error"]["message"]
        wrong = await client.post("/ui/api/keys", json={"name": "bad-csrf"}, headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 401
        headers = await csrf(client)
        created = await client.post("/ui/api/keys", json={"name": "team-a", "rpm": 10}, headers=headers)
        assert created.status_code == 201 and created.json()["key"]
        names = [k["name"] for k in (await client.get("/ui/api/keys")).json()["data"]]
        assert names == ["team-a"]
        changed = await client.patch("/ui/api/keys/team-a", json={"rpm": None, "tpm": 500}, headers=headers)
        assert changed.json()["limits"]["rpm"] is None and changed.json()["limits"]["tpm"] == 500
        bad = await client.patch("/ui/api/keys/team-a", json={"rpm": "many"}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
        assert (await client.delete("/ui/api/keys/team-a", headers=headers)).json()["state"] == "revoked"
        other = _new_client(gateway)  # another browser: its own session, the first one's CSRF token is not its
        async with other:
            await sign_in(other)
            assert (await other.post("/ui/api/keys", json={"name": "x"}, headers=headers)).status_code == 401
        session_cookie = client.cookies.get("embedq_console")
        out = await client.post("/ui/logout", headers=headers)
        assert out.status_code == 303 and out.headers["location"] == "/ui/login"
        assert (await client.get("/ui/api/fleet")).status_code == 401
        client.cookies.set("embedq_console", session_cookie)  # a copy of the cookie kept: the session is over all the same
        assert (await client.get("/ui/api/fleet")).status_code == 401
        assert (await client.get("/ui/")).status_code == 303


async def test_credentials_do_not_cross_between_the_console_and_the_apis(tmp_path):
    async with running({**SETTINGS, "EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        client = gateway.client
        await sign_in(client)
        headers = await csrf(client)
        assert (await client.get("/admin/v1/keys")).status_code == 401  # the cookie is no admin token
        assert (await client.get("/admin/v1/keys", headers=headers)).status_code == 401
        await gateway.worker()
        assert (await gateway.embed("hello")).status_code == 401  # nor a client key
        assert (await client.get("/v1/models")).status_code == 401


async def test_the_console_is_off_without_an_admin_token_and_gone_with_ui_false():
    async with running() as gateway:
        form = await gateway.client.get("/ui/login")
        assert form.status_code == 403 and "EMBEDQ_ADMIN_TOKENS" in form.text
        assert (await sign_in(gateway.client, "")).status_code == 403
    async with running({**SETTINGS, "EMBEDQ_UI": "false"}) as gateway:
        for path in ["/ui/", "/ui/login", "/ui/api/fleet", "/ui/static/app.js"]:
            assert (await gateway.client.get(path)).status_code == 404, path


async def test_the_fleet_shows_models_workers_their_leases_and_the_last_hours_calls():
    async with running(SETTINGS) as gateway:
        client = gateway.client
        await sign_in(client)
        worker = await gateway.worker()
        for _ in range(3):
            assert (await gateway.embed(["one", "two"])).status_code == 200
        assert (await client.post("/v1/embeddings", json={"model": "fake-model"})).status_code == 400  # no input
        await gateway.app.state.activity.flush()
        fleet = (await client.get("/ui/api/fleet")).json()
        [model] = fleet["models"]
        assert fleet["loops_down"] == []  # the overview warns when there are any (loops.py)
        assert model["id"] == "fake-model" and model["workers"] == 1 and model["dimensions"] == 16
        assert model["inputs_per_s"] == pytest.approx(6 / 60)
        [seen] = fleet["workers"]
        assert seen["id"] == worker.id and seen["state"] == "serving" and seen["engine"]["type"] == "fake"
        assert seen["software"] and seen["host"] and seen["inputs_per_s"] == pytest.approx(6 / 60)
        assert seen["posts_per_s"] == pytest.approx(3 / 60)
        activity = (await client.get("/ui/api/activity")).json()
        series = activity["series"]
        assert len(series["requests"]) == 360 and sum(series["requests"]) == 4
        assert sum(series["inputs"]) == 6 and sum(series["errors"]) == 1 and sum(series["rejected"]) == 0
        assert activity["models"]["fake-model"]["requests"] == 3 and activity["models"]["fake-model"]["p50"] > 0
        assert activity["models"]["(none)"]["errors"] == 1  # refused before its model was known
        await worker.kill()
        await gateway.app.state.workers.leave(worker.id)
        [gone] = (await client.get("/ui/api/fleet")).json()["workers"]
        assert gone["state"] == "gone"


async def test_batch_lines_count_apart_from_client_calls():
    async with running(SETTINGS) as gateway:
        await sign_in(gateway.client)
        await gateway.worker()
        lines = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                                    "body": {"model": "fake-model", "input": ["a", "b"]}}) + "\n" for i in range(5))  # fmt: skip
        upload = await gateway.client.post("/v1/files", files={"file": ("in.jsonl", lines.encode())}, data={"purpose": "batch"})
        body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}
        batch_id = (await gateway.client.post("/v1/batches", json=body)).json()["id"]

        async def status() -> str:
            return (await gateway.client.get(f"/v1/batches/{batch_id}")).json()["status"]

        for _ in range(200):
            if await status() == "completed":
                break
            await asyncio.sleep(0.05)
        await gateway.app.state.activity.flush()
        series = (await gateway.client.get("/ui/api/activity")).json()["series"]
        assert sum(series["batch_inputs"]) == 10 and sum(series["batch_tokens"]) > 0
        assert sum(series["requests"]) == 0 and sum(series["inputs"]) == 0  # no client call, no client latency


async def test_a_worker_holding_jobs_shows_its_leases():
    async with running(SETTINGS) as gateway:
        await sign_in(gateway.client)
        hand = HandWorker(gateway)
        await hand.register()
        request = asyncio.ensure_future(gateway.embed(["a", "b"]))
        jobs = await hand.lease()
        assert jobs
        fleet = (await gateway.client.get("/ui/api/fleet")).json()
        assert fleet["workers"][0]["leases"] == len(jobs)
        request.cancel()


async def test_each_queues_depth_and_oldest_job_are_sampled_into_the_hour():
    async with running(SETTINGS) as gateway:
        await sign_in(gateway.client)
        await HandWorker(gateway).register()  # serves the model, takes no job: they wait
        waiting = [asyncio.ensure_future(gateway.embed([f"text {n}"])) for n in range(3)]
        await gateway.until(lambda: sum(s.depth for s in gateway.app.state.queue.stats().values()) == 3, "3 jobs waiting")
        await asyncio.sleep(0.2)
        await gateway.app.state.activity.flush()
        queues = (await gateway.client.get("/ui/api/activity")).json()["queues"]
        depth, oldest = queues["fake-model"]["depth"], queues["fake-model"]["oldest_s"]
        assert len(depth) == 360 and depth[-1] == 3 and depth[0] is None  # a slot with no sample has none
        assert 0.2 <= oldest[-1] < 10
        await gateway.worker()
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200] * 3
        await gateway.app.state.activity.flush()
        queues = (await gateway.client.get("/ui/api/activity")).json()["queues"]
        assert queues["fake-model"]["depth"][-1] == 0  # the slot's last sample wins


async def test_the_playground_embeds_with_similarities_and_a_projection():
    async with running(SETTINGS) as gateway:
        client = gateway.client
        await sign_in(client)
        await gateway.worker()
        headers = await csrf(client)
        texts = ["a cat", "a dog", "a cat", "<script>alert(1)</script>"]
        answer = await client.post("/ui/api/embed", json={"model": "fake-model", "texts": texts}, headers=headers)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        similarity = body["similarity"]
        assert all(similarity[i][i] == pytest.approx(1.0, abs=1e-3) for i in range(4))
        assert similarity[0][2] == pytest.approx(1.0, abs=1e-3) and similarity[0][1] < 0.99
        assert body["points"][0] == pytest.approx(body["points"][2], abs=1e-3) and len(body["points"]) == 4
        assert body["tokens"] > 0 and body["dimensions"] == 16
        empty = await client.post("/ui/api/embed", json={"model": "fake-model", "texts": []}, headers=headers)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "texts"
        unknown = await client.post("/ui/api/embed", json={"model": "nope", "texts": ["x"]}, headers=headers)
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


async def test_usage_comes_as_csv_too(tmp_path):
    async with running({**SETTINGS, "EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        key = (await gateway.client.post("/admin/v1/keys", json={"name": "team-a"}, headers=admin)).json()["key"]
        await gateway.worker()
        embedded = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": ["x", "y"]},
                                             headers={"Authorization": f"Bearer {key}"})  # fmt: skip
        assert embedded.status_code == 200
        answer = await gateway.client.get("/admin/v1/usage?format=csv", headers=admin)
        assert answer.headers["content-type"].startswith("text/csv")
        assert "attachment" in answer.headers["content-disposition"]
        header, row = answer.text.splitlines()
        assert header.startswith("start,key,requests,inputs,prompt_tokens") and ",team-a,1,2," in row
        bad = await gateway.client.get("/admin/v1/usage?format=xml", headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
