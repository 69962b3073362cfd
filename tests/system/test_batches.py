"""Bulk embedding with real processes on default settings: the official openai client's round
trip at 10,000 lines, a batch that survives kill -9 of its gateway, of the replica driving it,
and of a worker, and interactive traffic unharmed by a batch beside it."""

from __future__ import annotations

import asyncio
import io
import random
import re
import signal
import time

import httpx
import numpy as np
import openai
import orjson
import pytest
import redis

from bench.batch import beside_batch
from bench.batch import start_batch as start_model_batch
from bench.stack import FREE, Engine
from gateway.batches.retention import Retention
from gateway.batches.store import BatchRecord, FileRecord, RedisStore
from gateway.redis_link import READS, RedisLink
from tests.system.conftest import Cluster, Gateway, fake_worker_config, free_port, wait_until
from tests.system.load import DIMS, MODEL, expected

pytestmark = pytest.mark.timeout(600)
ADMIN = "admin-token-for-batch-tests"


def make_lines(count: int, seed: int, inputs: tuple[int, int] = (1, 16)) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {f"req-{seed}-{i}": [f"text {seed} {i} {j} {rng.random()}" for j in range(rng.randint(*inputs))] for i in range(count)}


def start_batch(oai: openai.OpenAI, lines: dict[str, list[str]]):
    return start_model_batch(oai, MODEL, lines)


def wait_finished(oai: openai.OpenAI, batch_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = oai.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
        except openai.APIConnectionError:
            pass  # a gateway being restarted
        assert time.monotonic() < deadline, f"batch {batch_id} not finished in {timeout_s}s"
        time.sleep(0.5)


def wait_progress(oai: openai.OpenAI, batch_id: str, completed: int) -> None:
    wait_until(lambda: oai.batches.retrieve(batch_id).request_counts.completed >= completed, 120, f"{completed} lines done")


def check_output(oai: openai.OpenAI, batch, lines: dict[str, list[str]]) -> list[dict]:
    """Every line exactly once, in the file's order, each with the fake engine's vectors."""
    assert batch.status == "completed", batch
    errors = oai.files.content(batch.error_file_id).text.splitlines()[:3] if batch.error_file_id else []
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(lines), 0), errors
    output = [orjson.loads(line) for line in oai.files.content(batch.output_file_id).content.splitlines()]
    assert [o["custom_id"] for o in output] == list(lines)
    for o in output:
        vectors = np.array([d["embedding"] for d in o["response"]["body"]["data"]], dtype=np.float32)
        assert np.array_equal(vectors, expected(lines[o["custom_id"]])), o["custom_id"]
    return output


def client(gateway: Gateway, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=5, timeout=60)


def test_ten_thousand_lines_through_the_openai_client_each_once_with_its_vectors_and_usage(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_KEYS_DB": str(cluster.tmp / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN}, defaults=True)
    created = httpx.post(gateway.url + "/admin/v1/keys", json={"name": "indexer"}, headers={"Authorization": f"Bearer {ADMIN}"})
    secret = created.json()["key"]
    for _ in range(2):  # engines that cost nothing: this measures the path a batch takes, not an engine
        cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, quick=False, generator_extra=FREE))
    gateway.wait_for_model(MODEL)
    oai = client(gateway, secret)
    lines = make_lines(10_000, seed=1)
    started = time.monotonic()
    batch = wait_finished(oai, start_batch(oai, lines).id)
    took = time.monotonic() - started
    output = check_output(oai, batch, lines)
    print(f"10,000 lines ({sum(map(len, lines.values()))} inputs) in {took:.1f}s")
    direct = oai.embeddings.create(model=MODEL, input=lines["req-1-42"])
    batched = np.array([d["embedding"] for d in output[42]["response"]["body"]["data"]], dtype=np.float32)
    assert np.array_equal(np.array([d.embedding for d in direct.data], dtype=np.float32), batched)
    told = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in output)
    report = httpx.get(gateway.url + "/admin/v1/usage", params={"key": "indexer"}, headers={"Authorization": f"Bearer {ADMIN}"})
    (row,) = report.json()["data"]
    assert (row["batch_requests"], row["batch_inputs"], row["batch_prompt_tokens"]) == (
        10_000, sum(map(len, lines.values())), told)  # fmt: skip


def test_a_gateway_killed_mid_batch_finishes_it_after_a_restart_with_no_line_lost_or_repeated(cluster: Cluster):
    port, data = free_port(), str(cluster.tmp / "data")
    gateway = cluster.gateway(port=port, env={"EMBEDQ_DATA_DIR": data}, defaults=True)
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.02, max_num_seqs=16))
    gateway.wait_for_model(MODEL)
    oai = client(gateway)
    lines = make_lines(3000, seed=2, inputs=(1, 4))
    batch = start_batch(oai, lines)
    wait_progress(oai, batch.id, 300)
    gateway.proc.stop(signal.SIGKILL)
    restarted = cluster.gateway(port=port, env={"EMBEDQ_DATA_DIR": data}, defaults=True)
    restarted.wait_for_model(MODEL)  # the worker comes back to it by itself
    check_output(oai, wait_finished(oai, batch.id), lines)


@pytest.mark.parametrize("queue_backend", ["redis"])
def test_the_other_replica_finishes_a_batch_whose_driving_replica_was_killed(cluster: Cluster, queue_backend: str):
    assert cluster.redis is not None
    first, second = cluster.gateway(defaults=True), cluster.gateway(defaults=True)
    cluster.worker(fake_worker_config(second.url, MODEL, dimensions=DIMS, delay_s=0.02, max_num_seqs=16))
    first.wait_for_model(MODEL)
    lines = make_lines(2000, seed=3, inputs=(1, 4))
    batch = start_batch(client(first), lines)
    oai = client(second)  # the replica that lives: it shows the batch as the first one wrote it
    wait_progress(oai, batch.id, 200)
    shared = redis.Redis.from_url(cluster.redis.url)
    driver = shared.get(f"{cluster.prefix}:batch:{batch.id}:driver")
    assert driver is not None
    first_id, second_id = (re.search(r"this replica (\w+)", gw.proc.log()).group(1) for gw in (first, second))  # type: ignore[union-attr]
    assert driver.decode() == first_id, "the replica that created the batch drives it first"
    first.proc.stop(signal.SIGKILL)
    check_output(oai, wait_finished(oai, batch.id), lines)
    assert shared.get(f"{cluster.prefix}:batch:{batch.id}:driver") in (None, second_id.encode())


def test_a_worker_killed_mid_batch_loses_no_line(cluster: Cluster):
    gateway = cluster.gateway(defaults=True)
    doomed = cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.02, max_num_seqs=16))
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.02, max_num_seqs=16))
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 2, 30, "two workers")
    oai = client(gateway)
    lines = make_lines(2000, seed=4, inputs=(1, 4))
    batch = start_batch(oai, lines)
    wait_progress(oai, batch.id, 200)
    doomed.stop(signal.SIGKILL)
    check_output(oai, wait_finished(oai, batch.id), lines)


def test_interactive_traffic_keeps_its_latency_while_a_batch_fills_the_idle_capacity(cluster: Cluster):
    """One fake worker at its default, real-shaped cost; interactive clients send short requests
    at 8/s, a batch of long texts takes the rest."""
    gateway = cluster.gateway(defaults=True)
    port = free_port()
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, max_model_len=256, metrics_port=port))
    gateway.wait_for_model(MODEL)
    engine = Engine(f"http://127.0.0.1:{port}/metrics")
    figures = asyncio.run(beside_batch(gateway.url, MODEL, engine.counters, rate=8, seconds=12, lines=6000))
    print(figures.summary())
    assert figures.served_all, figures.summary()
    # Measured here: p99 plus 0.05-0.15 s beside the batch (a call of bulk work sized to half the
    # interactive objective, and the one running when the first request came after a quiet spell);
    # the batch kept 85-88% (69% once, on a loaded CI machine). With calls as full as the engine
    # takes, p99 rose by 0.6 s.
    assert figures.shared_p99_s <= figures.alone_p99_s + 0.35, figures.summary()
    assert figures.batch_share >= 0.6, figures.summary()


@pytest.mark.anyio
@pytest.mark.parametrize("queue_backend", ["redis"])
async def test_what_retention_deletes_leaves_nothing_of_it_in_redis(cluster: Cluster, queue_backend: str):
    """The Redis store's side of the sweep (the fast tier runs it on a data directory): a deleted
    output file takes its answers, a batch past its retention its record, flags, claim and the
    rest of its answers, an upload its bytes; only the id counter is left."""
    link = RedisLink(cluster.redis.url, None, cluster.prefix)
    await link.start()
    raw = redis.asyncio.Redis.from_url(cluster.redis.url)
    try:
        await _retention_in_redis(cluster.prefix, RedisStore(link), raw)
    finally:
        await raw.aclose()
        await link.stop()


async def _retention_in_redis(prefix: str, store: RedisStore, raw: redis.asyncio.Redis) -> None:
    now = int(time.time())
    upload = FileRecord("file-in", "team", "batch", "in.jsonl", 3, now, await store.next_seq(), expires_at=now + 3600)
    await store.put_file(upload, io.BytesIO(b"{}\n"))
    doc = {"id": "batch_1", "status": "completed", "input_file_id": upload.id, "created_at": now, "completed_at": now,
           "output_file_id": "file-out", "error_file_id": "file-err"}  # fmt: skip
    await store.save_batch(BatchRecord("batch_1", "team", await store.next_seq(), doc))
    await store.record("batch_1", [(0, True, b"answer\n", 7), (1, False, b"error\n", 6)])
    await store.request_cancel("batch_1")
    assert await store.claim("batch_1", "replica", 60)
    for file_id, ok in (("file-out", True), ("file-err", False)):
        await store.put_file(FileRecord(file_id, "team", "batch_output", f"{file_id}.jsonl", 7, now, await store.next_seq(),
                                        "batch_1", ok, now + 3600), None)  # fmt: skip

    async def keys() -> set[str]:
        every = {k.decode().removeprefix(prefix + ":") async for k in raw.scan_iter(f"{prefix}:*")}
        return {k for k in every if not k.startswith("alive:")}  # the link's own

    assert {"batch:batch_1:ok", "batch:batch_1:failed", "batch:batch_1:driver", "file:file-in"} <= await keys()
    await store.delete_file(await store.file("file-out"))
    assert "batch:batch_1:ok" not in await keys() and await store.counts("batch_1") == (0, 1, 0, 6)
    assert await Retention(store, 86400).sweep(now + 86400) == (2, 1)  # the error file and the upload; the batch
    assert await keys() == {"batches:seq", "retention:since"}
    assert await store.fleet_reads() == READS  # this replica alone reads every frame...
    await raw.set(f"{prefix}:alive:an-older-replica", b"1", px=5000)  # (what releases before frames write)
    assert await store.fleet_reads() == 1  # ...one that reads none is alive beside it
