"""Edges of the gateway that an in-process test reaches: what an unexpected error, a hang-up, a
saturated thread pool, a locked key database or a taken port do to it."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3

import anyio.to_thread
import pytest
from starlette.requests import Request
from starlette.responses import Response

from gateway.tenancy.keys import SqliteKeyStore
from tests.fakes import fake_worker_config, metric
from tests.fast.conftest import HandWorker, running
from worker.__main__ import serve
from worker.config import parse_config

pytestmark = pytest.mark.anyio


async def test_an_unexpected_error_is_a_generic_500_counted_as_500_and_logged_once(caplog):
    async def broken(request: Request) -> Response:
        raise RuntimeError("internal detail the client must not see")

    async with running() as gateway:
        gateway.app.add_route("/v1/broken", broken, methods=["POST"])
        response = await gateway.client.post("/v1/broken", json={})
        metrics = await gateway.metrics()
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "internal detail" not in response.text
    assert metric(metrics, 'embedq_gateway_requests_total{endpoint="other",status="500"}') == 1
    assert metric(metrics, 'embedq_gateway_requests_total{endpoint="other",status="499"}') == 0
    tracebacks = [r for r in caplog.records if r.exc_info and "internal detail" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]


async def test_errors_are_answered_without_a_worker_thread():
    """A storm of 404s or 429s must not queue behind the thread pool: error responses render on
    the event loop. Here every thread of the pool is taken, and errors still come back."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    async with running() as gateway:
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        try:
            with anyio.fail_after(5):
                missing = await gateway.client.get("/v1/nothing-here")
                unknown = await gateway.embed("x", model="no-such-model")
        finally:
            for holder in holders:
                limiter.release_on_behalf_of(holder)
    assert missing.status_code == 404 and unknown.status_code == 404


async def test_retry_after_follows_the_setting_when_draining_and_when_attempts_run_out():
    env = {"EMBEDQ_RETRY_AFTER_S": "7", "EMBEDQ_MAX_ATTEMPTS": "1", "EMBEDQ_LEASE_TTL_S": "1"}
    async with running(env) as gateway:
        silent = HandWorker(gateway, "w-silent")
        assert (await silent.register()).status_code == 200
        request = asyncio.create_task(gateway.embed("taken and never answered"))
        assert len(await silent.lease()) == 1
        exhausted = await request
        gateway.app.state.draining = True
        draining = await gateway.embed("too late")
    assert exhausted.status_code == 503 and exhausted.json()["error"]["code"] == "attempts_exhausted"
    assert exhausted.headers["retry-after"] == "7"
    assert draining.status_code == 503 and draining.headers["retry-after"] == "7"


async def test_a_locked_key_database_does_not_stall_requests(tmp_path):
    """A `keys` command holding the database's write lock (for seconds) must not stall the event
    loop: last-used times are written later, off the loop."""
    db = tmp_path / "keys.db"
    store = SqliteKeyStore(db)
    secret, _ = store.create("team", None, None)
    store.close()
    async with running({"EMBEDQ_KEYS_DB": str(db)}) as gateway:
        await gateway.worker()
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # what a CLI writing a key holds
        try:
            with anyio.fail_after(3):  # the old code waited 5 s for the lock, on the loop
                ok = await gateway.client.post(
                    "/v1/embeddings", json={"model": "fake-model", "input": "x"}, headers={"Authorization": f"Bearer {secret}"}
                )
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert ok.status_code == 200
    reread = SqliteKeyStore(db)
    assert reread.all()[0].last_used_at is not None  # written when the gateway stopped
    reread.close()


async def test_the_key_database_is_owner_only(tmp_path):
    db = tmp_path / "private" / "keys.db"
    SqliteKeyStore(db).close()
    assert db.stat().st_mode & 0o777 == 0o600 and db.parent.stat().st_mode & 0o777 == 0o700


async def test_a_client_hanging_up_mid_body_is_a_quiet_499(caplog):
    sent: list[dict] = []
    async with running() as gateway:
        app = gateway.app
        messages = iter(
            [{"type": "http.request", "body": b'{"model": "fake-model", "inp', "more_body": True}, {"type": "http.disconnect"}]
        )

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/embeddings",
            "raw_path": b"/v1/embeddings",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "app": app,
            "scheme": "http",
            "server": ("gateway", 80),
            "client": ("127.0.0.1", 5000),
            "root_path": "",
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        await app(scope, receive, send)
        metrics = await gateway.metrics()
    assert metric(metrics, 'embedq_gateway_requests_total{endpoint="/v1/embeddings",status="499"}') == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


async def test_a_taken_metrics_port_is_one_line_naming_the_key(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(fake_worker_config("http://127.0.0.1:9", metrics_port=port))
        with caplog.at_level(logging.ERROR):
            code = await serve(config, "", "127.0.0.1")
    assert code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "monitoring.metrics_port" in line and str(port) in line
    assert not any(r.exc_info for r in caplog.records)


async def test_a_background_loop_that_raises_is_restarted_counted_and_shown_in_health(caplog):
    """Lease expiry's loop, broken twice by a bug: /health says so meanwhile, and then leases
    expire again (a job held by a silent worker is answered by another)."""
    async with running({"EMBEDQ_LEASE_TTL_S": "1"}) as gateway:
        store = gateway.app.state.queue._store
        expire, failures = store.expire, [RuntimeError("a bug in lease expiry")] * 2

        async def broken_twice():
            if failures:
                raise failures.pop()
            return await expire()

        store.expire = broken_twice
        seen_down = False
        for _ in range(200):
            health = await gateway.client.get("/health")
            if health.status_code == 503:
                assert health.json()["loops_down"] == ["queue upkeep"] and health.json()["status"] == "degraded"
                seen_down = True
            if not failures and health.status_code == 200:
                break
            await asyncio.sleep(0.01)
        silent = HandWorker(gateway, "w-silent")
        await silent.register()
        request = asyncio.create_task(gateway.embed("held by a silent worker"))
        assert len(await silent.lease(hold_s=1)) == 1
        await gateway.worker()
        response = await asyncio.wait_for(request, 5)
        metrics = await gateway.metrics()
    assert seen_down and response.status_code == 200
    assert metric(metrics, 'embedq_gateway_loop_restarts_total{loop="queue upkeep"}') == 2
    assert (
        sum("a bug in lease expiry" in r.getMessage() or "a bug in lease expiry" in str(r.exc_info) for r in caplog.records) == 2
    )
