"""What stalled bodies, hellos and departed workers may hold of the gateway: bounded, and given
back (the connection-level bounds, with real sockets, are in tests/system/test_http_edges.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.responses import StreamingResponse

from contract.messages import MAX_HELLO_BYTES, MAX_PROMPTS, ModelCard, WorkerHello
from gateway.dialects.openai import embeddings_body, render_embeddings
from gateway.errors import ModelNotFound, NoLiveWorker
from gateway.http import vectors_response
from gateway.registry.local import GONE_KEPT, WorkerRegistry
from tests.fakes import expected
from tests.fast.conftest import HandWorker, running

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


async def _post(app: Starlette, chunks: asyncio.Queue) -> tuple[int, dict[bytes, bytes], bytes]:
    """POST /v1/embeddings through ASGI, its body taken from ``chunks`` as they come (None ends
    it; "gone" hangs up): the status, headers and body of the answer."""
    sent: list[dict] = []

    async def receive() -> dict:
        chunk = await chunks.get()
        if chunk == "gone":
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "app": app, "scheme": "http",
             "server": ("gateway", 80), "client": ("127.0.0.1", 5000), "root_path": "", "http_version": "1.1",
             "asgi": {"version": "3.0"}}  # fmt: skip
    await app(scope, receive, send)
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return 0, {}, b""  # it hung up: no answer
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def test_bodies_past_the_budget_in_flight_get_503_and_a_finished_body_gives_its_bytes_back():
    async with running({"EMBEDQ_MAX_BODY_BYTES_IN_FLIGHT": str(1 * MiB)}) as gateway:
        app = gateway.app
        stalled: asyncio.Queue = asyncio.Queue()
        stalled.put_nowait(b'{"model": "fake-model", "input": "' + b"x" * (MiB - 100 * 1024))
        holder = asyncio.ensure_future(_post(app, stalled))
        await asyncio.sleep(0.05)
        assert app.state.bodies.held > 800 * 1024  # all but its first 64 KiB counted

        second: asyncio.Queue = asyncio.Queue()
        for chunk in (b'{"model": "fake-model", "input": "', b"y" * 300 * 1024, b'"}', None):
            second.put_nowait(chunk)
        status, headers, body = await _post(app, second)
        assert status == 503 and b"server_busy" in body, body
        assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"

        small: asyncio.Queue = asyncio.Queue()
        for chunk in (b'{"model": "fake-model", "input": "', b"z" * 30 * 1024, b'"}', None):
            small.put_nowait(chunk)
        status, _, body = await _post(app, small)
        assert status != 503, body  # a body within its first 64 KiB is never refused for the budget

        stalled.put_nowait("gone")
        await holder
        assert app.state.bodies.held == 0
        for chunk in (b'{"model": "fake-model", "input": "', b"y" * 300 * 1024, b'"}', None):
            second.put_nowait(chunk)
        status, _, body = await _post(app, second)
        assert status != 503, body


@pytest.mark.parametrize("min_rate, refused", [(1000, True), (0, False)], ids=["floor-rate", "no-floor"])
async def test_a_body_that_drips_below_the_floor_rate_gets_408(min_rate: int, refused: bool):
    """Bytes every 0.05 s (no pause reaches the 0.3 s timeout) at 200 bytes/s: stalled, by the floor."""
    async with running({"EMBEDQ_BODY_TIMEOUT_S": "0.3", "EMBEDQ_BODY_MIN_RATE": str(min_rate)}) as gateway:
        app = gateway.app
        drip: asyncio.Queue = asyncio.Queue()

        async def feed() -> None:
            drip.put_nowait(b'{"model": "fake-model", "input": "')
            for _ in range(12):
                await asyncio.sleep(0.05)
                drip.put_nowait(b"x" * 10)
            drip.put_nowait(b'"}')
            drip.put_nowait(None)

        feeder = asyncio.ensure_future(feed())
        status, headers, body = await _post(app, drip)
        feeder.cancel()
    if refused:
        assert status == 408 and b"stalled" in body and headers[b"connection"] == b"close", body
    else:
        assert status not in (0, 408), body


async def test_a_hello_is_bounded_in_bytes_prompts_and_engine_values():
    async with running() as gateway:
        worker = HandWorker(gateway)
        huge = await worker.register(
            description="d" * 2000, prompts={f"p{i}": "x" * 4000 for i in range(MAX_HELLO_BYTES // 4000)}
        )
        many = await worker.register(prompts={f"p{i}": "x" for i in range(MAX_PROMPTS + 1)})
        hello = {"worker_id": "w", "checkpoint_name": "c", "max_batch_items": 8, "engine": {"model_path": "x" * 1025},
                 "models": {"m": {"max_input_tokens": 64, "dimensions": 16}}}  # fmt: skip
        long_value = await worker.call("/workers/heartbeat", json=hello)
    assert huge.status_code == 413, huge.text
    assert many.status_code == 400 and "prompts" in many.json()["error"]["message"], many.text
    assert long_value.status_code == 400 and "engine" in long_value.json()["error"]["message"], long_value.text


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hello(worker_id: str, *models: str) -> WorkerHello:
    card = ModelCard(max_input_tokens=64, dimensions=16)
    return WorkerHello(worker_id=worker_id, checkpoint_name="c", max_batch_items=8, models={m: card for m in models})


async def test_a_model_no_live_worker_names_is_forgotten_after_model_ttl():
    clock = _Clock()
    registry = WorkerRegistry(worker_ttl_s=10, stuck_s=30, model_ttl_s=100, clock=clock)
    await registry.heartbeat(_hello("w1", "kept", "dropped"), "s1")
    await registry.heartbeat(_hello("w2", "kept"), "s2")
    clock.now += 50
    await registry.heartbeat(_hello("w2", "kept"), "s2")  # w1 has gone silent; w2 still names "kept"
    clock.now += 11
    await registry.sweep()
    with pytest.raises(NoLiveWorker):
        await registry.resolve("dropped")  # gone for now: it may come back
    clock.now += 100
    await registry.heartbeat(_hello("w2", "kept"), "s2")
    await registry.sweep()
    with pytest.raises(ModelNotFound):
        await registry.resolve("dropped")  # no live worker named it for model_ttl_s: forgotten
    assert (await registry.resolve("kept")).workers == 1
    assert not registry.knows("dropped") and registry.knows("kept")


async def test_what_departed_workers_named_leaves_nothing_behind():
    clock = _Clock()
    registry = WorkerRegistry(worker_ttl_s=10, stuck_s=30, model_ttl_s=100, clock=clock)
    for i in range(3 * GONE_KEPT):
        await registry.heartbeat(_hello(f"w{i}", *(f"model-{i}-{j}" for j in range(4))), f"s{i}")
        await registry.leave(f"w{i}")
    assert len(registry.views()) == GONE_KEPT  # the console lists the newest departed, not all
    clock.now += 101
    await registry.sweep()
    held = [registry._ever_served, registry._first_seen, registry._named_by, registry._last_named, registry._workers]
    assert not any(held), [len(h) for h in held]


PROBE = """import os, sys
print(os.getpid(), os.environ.get("PYTHONMALLOC"), flush=True)
from gateway import memory
memory.use_system_allocator()
memory.give_back()
print(os.getpid(), os.environ["PYTHONMALLOC"], flush=True)
"""


@pytest.mark.parametrize(("chosen", "lines"), [(None, ["None", "malloc", "malloc"]), ("pymalloc", ["pymalloc", "pymalloc"])])
def test_the_gateway_runs_on_malloc_unless_the_operator_chose(chosen: str | None, lines: list[str]):
    """CPython's pymalloc keeps what a burst of departed workers held (gateway/memory.py): the
    serving process starts itself again, same process, on the C library's malloc."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"} | ({"PYTHONMALLOC": chosen} if chosen else {})
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=30, check=True)
    printed = [line.split() for line in done.stdout.splitlines()]
    assert [allocator for _, allocator in printed] == lines
    assert len({pid for pid, _ in printed}) == 1  # exec, not a child


async def test_what_one_request_may_cost_is_bounded_on_every_route_with_a_413_naming_the_bound():
    """Ollama's /api/embed has no input cap (as Ollama), rerank and score take lists of any
    length: 200,000 short inputs were ~6,000 jobs built on the event loop and gigabytes of
    vectors to answer. Refused now on default settings, before any validation, in each dialect's
    shape; what real clients send (thousands) is served."""
    many = [f"t{i}" for i in range(200_000)]
    async with running() as gateway:
        await gateway.worker()
        client = gateway.client
        started = time.monotonic()
        ollama = await client.post("/api/embed", json={"model": "fake-model", "input": many})
        refused_in = time.monotonic() - started
        jina = await client.post("/v1/rerank", json={"model": "fake-model", "query": "q", "documents": many[:100_000]})
        cohere = await client.post("/v2/rerank", json={"model": "fake-model", "query": "q", "documents": many[:100_000]})
        score = await client.post("/score", json={"model": "fake-model", "text_1": "q", "text_2": many[:70_000]})
        served = await client.post("/api/embed", json={"model": "fake-model", "input": many[:5_000]})
    assert ollama.status_code == 413 and "EMBEDQ_MAX_REQUEST_INPUTS" in ollama.json()["error"], ollama.text
    assert "'input' has 200000 items" in ollama.json()["error"] and refused_in < 5
    assert jina.status_code == 413 and jina.json()["error"]["param"] == "documents" and "detail" in jina.json()
    assert cohere.status_code == 413 and "EMBEDQ_MAX_REQUEST_INPUTS" in cohere.json()["message"]
    assert score.status_code == 413 and score.json()["error"]["param"] == "text_2"
    assert served.status_code == 200 and len(served.json()["embeddings"]) == 5_000


async def test_the_vectors_a_request_needs_are_bounded_by_the_models_dimensions():
    async with running({"EMBEDQ_MAX_ANSWER_VALUES": str(100 * 16)}) as gateway:  # 100 inputs of the fake's 16 dimensions
        await gateway.worker()
        fits = await gateway.embed([f"text {i}" for i in range(100)])
        over = await gateway.embed([f"text {i}" for i in range(101)])
        rerank = await gateway.client.post("/v1/rerank", json={"model": "fake-model", "query": "q",
                                                                "documents": [f"d{i}" for i in range(100)]})  # fmt: skip
    assert fits.status_code == 200
    message = over.json()["error"]["message"]
    assert over.status_code == 413 and "EMBEDQ_MAX_ANSWER_VALUES" in message and "100 inputs of this model" in message
    assert rerank.status_code == 413  # 101 vectors, to take the query's cosine with each document


async def test_a_large_request_waits_only_for_others_work():
    """Admission counts what a request waits for, not its own work: a legal request of 2 s of work
    beside a light one in flight (queue wait at most 1 s here) was a 429, and again on every retry."""
    async with running({"EMBEDQ_MAX_QUEUE_WAIT_S": "1"}) as gateway:
        await gateway.worker(delay_s=0.25, max_num_seqs=32)
        for _ in range(3):  # the worker measures its pace, and leases say it
            assert (await gateway.embed([f"warm {i}" for i in range(32)])).status_code == 200
        light = asyncio.create_task(gateway.embed("a light request in line"))
        loads = gateway.app.state.service._load
        await gateway.until(lambda: any(load.requests for load in loads.values()), "the light request in line")
        large = await gateway.embed([f"input {i}" for i in range(256)])  # 8 calls: 2 s of its own
        assert large.status_code == 200, large.text
        assert (await light).status_code == 200


async def test_a_large_answer_is_streamed_in_pieces_with_the_same_bytes():
    """2,048 vectors of 4,096 (the most EMBEDQ_MAX_ANSWER_VALUES allows, as 21,845 of 384) rendered
    by one orjson call held the event loop ~0.5 s (0.8 s on /api/embed beside a light client, in the
    system probe, tests/system/test_large_requests.py); streamed, each piece is a few ms, and the
    bytes are those of one call, on both routes (here at 1,024 dimensions, for the fast tier's time)."""
    texts = [f"text {i}" for i in range(2048)]
    vectors = expected(texts, 1024)
    body = embeddings_body("fake-model", vectors, 8192, "float")
    response = vectors_response(body, "data", 1024)
    assert isinstance(response, StreamingResponse)
    pieces, took = [], []
    iterator = response.body_iterator.__aiter__()
    while True:
        started = time.perf_counter()
        try:
            pieces.append(await iterator.__anext__())
        except StopAsyncIteration:
            break
        took.append(time.perf_counter() - started)
    assert b"".join(pieces) == render_embeddings("fake-model", vectors, 8192, "float")  # byte for byte
    assert len(pieces) > 16 and max(took) < 0.05, (len(pieces), max(took))
    texts, vectors = texts[:512], vectors[:512]
    async with running() as gateway:
        await gateway.worker(dimensions=1024)
        answers = [
            await gateway.client.post(path, json={"model": "fake-model", "input": texts})
            for path in ("/v1/embeddings", "/api/embed")
        ]
    assert [a.status_code for a in answers] == [200, 200], answers[0].text[:300]
    assert "content-length" not in answers[0].headers and "content-length" not in answers[1].headers  # streamed
    openai_answer, ollama_answer = (a.json() for a in answers)
    assert answers[0].content == render_embeddings("fake-model", vectors, openai_answer["usage"]["prompt_tokens"], "float")
    assert np.array_equal(np.array(ollama_answer["embeddings"], dtype=np.float32), vectors)
