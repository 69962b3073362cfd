"""The Files and Batches API in process: the official openai client's whole round trip on fake
workers, OpenAI's validation, ownership, cancel, and a restart on the same data directory."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import subprocess
import sys
import urllib.parse

import httpx
import numpy as np
import openai
import orjson
import pytest

from gateway.batches import api, runner
from gateway.batches.retention import GRACE_S
from gateway.batches.store import BatchEnded, DataDirBusy, DirStore, FileRecord
from gateway.tenancy.keys import SqliteKeyStore
from gateway.tenancy.limits import Limits
from tests.fakes import expected, metric
from tests.fast.conftest import URL, Gateway, running

pytestmark = pytest.mark.anyio
ADMIN = "admin-token-for-batch-tests"


def client(gateway: Gateway, key: str = "none") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL, timeout=30)
    return openai.AsyncOpenAI(base_url=URL + "/v1", api_key=key, http_client=http, max_retries=0)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def request_line(custom_id: str, texts: list[str] | str, model: str = "fake-model", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": texts, **body}}


async def start(oai: openai.AsyncOpenAI, lines: list[dict]):
    """Upload the lines as a batch input file and start a batch on it."""
    uploaded = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return uploaded, await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


async def finished(oai: openai.AsyncOpenAI, batch_id: str, timeout_s: float = 30):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        batch = await oai.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert asyncio.get_running_loop().time() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.05)


async def test_the_openai_client_runs_a_batch_and_every_line_comes_back_once_as_v1_embeddings_answers():
    async with running({"EMBEDQ_ADMIN_TOKENS": ADMIN}) as gateway:
        await gateway.worker()
        oai = client(gateway)
        texts = {f"line-{i}": [f"text {i} {j}" for j in range(1 + i % 16)] for i in range(300)}
        lines = [request_line(cid, t) for cid, t in texts.items()] + [request_line("bad", "")]
        uploaded = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                         metadata={"job": "index"})  # fmt: skip
        assert batch.status == "validating" and batch.metadata == {"job": "index"}
        done = await finished(oai, batch.id)
        assert done.status == "completed", done
        assert done.request_counts.total == 301 and done.request_counts.completed == 300 and done.request_counts.failed == 1
        output = [orjson.loads(line) for line in (await oai.files.content(done.output_file_id)).content.splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(texts)
        tokens = 0
        for line in output:
            body = line["response"]["body"]
            assert line["response"]["status_code"] == 200 and line["error"] is None
            vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
            assert np.array_equal(vectors, expected(texts[line["custom_id"]])), line["custom_id"]
            tokens += body["usage"]["prompt_tokens"]
        assert done.model == "fake-model" and done.usage is not None
        assert done.usage.input_tokens == done.usage.total_tokens == tokens and done.usage.output_tokens == 0
        direct = await gateway.embed(texts["line-7"])
        assert direct.json()["data"] == next(o for o in output if o["custom_id"] == "line-7")["response"]["body"]["data"]
        errors = [orjson.loads(line) for line in (await oai.files.content(done.error_file_id)).content.splitlines()]
        assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("bad", 400)]
        assert errors[0]["response"]["body"]["error"]["param"] == "input"
        metrics = await gateway.metrics()
        assert metric(metrics, 'embedq_gateway_batch_lines_total{model="fake-model",state="completed"}') == 300
        assert metric(metrics, 'embedq_gateway_batch_lines_total{model="fake-model",state="failed"}') == 1
        assert metric(metrics, 'embedq_gateway_batch_backlog_lines{model="fake-model"}') == 0
        usage = await gateway.client.get("/admin/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"})
        (row,) = usage.json()["data"]
        assert (row["batch_requests"], row["batch_prompt_tokens"]) == (301, tokens), row
        assert row["batch_inputs"] == sum(map(len, texts.values()))


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (orjson.dumps({**request_line("a", "x"), "url": "/v1/chat/completions"}), "url_mismatch", "url"),
        (orjson.dumps({**request_line("a", "x"), "method": "GET"}), "invalid_method", "method"),
        (orjson.dumps(request_line("a", "x", model="no-such-model")), "model_not_found", "body.model"),
        (orjson.dumps(request_line("first", "x")), "duplicate_custom_id", "custom_id"),
        (
            orjson.dumps({"method": "POST", "url": "/v1/embeddings", "body": {"model": "fake-model", "input": "x"}}),
            "missing_required_parameter",
            "custom_id",
        ),
    ],
)
async def test_a_bad_line_fails_the_batch_at_validation_naming_the_line(line: bytes, code: str, param: str | None):
    async with running() as gateway:
        await gateway.worker()
        oai = client(gateway)
        content = orjson.dumps(request_line("first", "ok")) + b"\n" + line + b"\n"
        uploaded = await oai.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        done = await finished(oai, batch.id)
        assert done.status == "failed" and done.errors is not None
        error = done.errors.data[0]
        assert (error.code, error.line, error.param) == (code, 2, param), error
        assert (await gateway.embed("still served")).status_code == 200


async def test_files_and_batches_belong_to_their_key_and_bad_calls_get_openais_errors(tmp_path):
    store = SqliteKeyStore(tmp_path / "keys.db")
    mine, _ = store.create("mine", None, None, Limits())
    theirs, _ = store.create("theirs", None, None, Limits())
    async with running({"EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        await gateway.worker()
        oai, other = client(gateway, mine), client(gateway, theirs)
        uploaded = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl([request_line("a", "x")]))), purpose="batch")
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        stolen = other.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        for call in (other.files.retrieve(uploaded.id), other.files.content(uploaded.id), other.batches.retrieve(batch.id),
                     other.batches.cancel(batch.id), other.files.delete(uploaded.id), stolen):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                await call
        assert (await other.files.list()).data == [] and (await other.batches.list()).data == []
        assert [f.id for f in (await oai.files.list()).data] == [uploaded.id]
        with pytest.raises(openai.BadRequestError) as wrong:
            await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")  # type: ignore[arg-type]
        assert wrong.value.param == "endpoint"
        with pytest.raises(openai.BadRequestError) as wrong:
            await oai.files.create(file=("in.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
        assert wrong.value.param == "purpose"
        with pytest.raises(openai.AuthenticationError):
            await client(gateway, "sk-nobody").files.list()
        assert (await finished(oai, batch.id)).status == "completed"


async def test_an_upload_over_the_size_limit_is_413_before_it_is_read(monkeypatch):
    monkeypatch.setattr(api, "MAX_FILE_BYTES", 1000)
    async with running() as gateway:
        big = jsonl([request_line(f"line-{i}", "some text") for i in range(100)])
        response = await gateway.client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", big)})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
        assert (await gateway.client.get("/v1/files")).json()["data"] == []


async def test_a_cancelled_batch_stops_its_lines_and_keeps_what_was_done():
    async with running() as gateway:
        await gateway.worker(delay_s=0.05, max_num_seqs=2)
        oai = client(gateway)
        lines = [request_line(f"line-{i}", f"text {i}") for i in range(2000)]
        uploaded, batch = await start(oai, lines)
        while (await oai.batches.retrieve(batch.id)).request_counts.completed < 10:
            await asyncio.sleep(0.05)
        assert (await oai.batches.cancel(batch.id)).status == "cancelling"
        done = await finished(oai, batch.id, timeout_s=5)
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert 10 <= done.request_counts.completed < 2000
        output = (await oai.files.content(done.output_file_id)).content.splitlines()
        assert len(output) == done.request_counts.completed
        served = gateway.workers[0].engine.batches
        await asyncio.sleep(0.5)
        assert gateway.workers[0].engine.batches <= served + 1  # nothing more of it runs


async def test_files_and_a_batch_half_done_survive_a_restart_on_the_same_data_directory(tmp_path):
    env = {"EMBEDQ_DATA_DIR": str(tmp_path / "data")}
    lines = [request_line(f"line-{i}", f"text {i}") for i in range(400)]
    async with running(env) as gateway:
        await gateway.worker(delay_s=0.02, max_num_seqs=4)
        oai = client(gateway)
        uploaded, batch = await start(oai, lines)
        while (await oai.batches.retrieve(batch.id)).request_counts.completed < 20:
            await asyncio.sleep(0.02)
    async with running(env) as gateway:
        await gateway.worker()
        oai = client(gateway)
        assert (await oai.files.retrieve(uploaded.id)).bytes == len(jsonl(lines))
        done = await finished(oai, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 400
        output = [orjson.loads(line)["custom_id"] for line in (await oai.files.content(done.output_file_id)).content.splitlines()]
        assert output == [line["custom_id"] for line in lines]  # each once, in the file's order


async def test_a_second_gateway_on_the_same_data_directory_is_refused(tmp_path):
    env = {"EMBEDQ_DATA_DIR": str(tmp_path)}
    async with running(env):
        with pytest.raises(DataDirBusy):
            async with running(env):
                pass


async def test_a_cancel_acknowledged_as_the_last_lines_finish_ends_cancelled(monkeypatch):
    """The runner looks for a cancel only every CANCEL_LOOK_S: here never while the lines run, so
    every line is done before it looks; the client was told "cancelling", and so it ends."""
    monkeypatch.setattr(runner, "CANCEL_LOOK_S", 60)
    async with running() as gateway:
        await gateway.worker(delay_s=0.05)
        oai = client(gateway)
        _, batch = await start(oai, [request_line(f"line-{i}", f"text {i}") for i in range(5)])
        assert (await oai.batches.cancel(batch.id)).status == "cancelling"
        done = await finished(oai, batch.id, timeout_s=10)
    assert done.status == "cancelled" and done.cancelled_at is not None, done


async def test_a_batch_whose_key_is_revoked_stops_within_a_second_its_unrun_lines_saying_why(tmp_path):
    store = SqliteKeyStore(tmp_path / "keys.db")
    secret, _ = store.create("team", None, None)
    store.close()
    env = {"EMBEDQ_KEYS_DB": str(tmp_path / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN}
    async with running(env) as gateway:
        await gateway.worker(delay_s=0.05, max_num_seqs=2)
        oai = client(gateway, secret)
        _, batch = await start(oai, [request_line(f"line-{i}", f"text {i}") for i in range(2000)])
        while (await oai.batches.retrieve(batch.id)).request_counts.completed < 10:
            await asyncio.sleep(0.05)
        revoked = await gateway.client.delete("/admin/v1/keys/team", headers={"Authorization": f"Bearer {ADMIN}"})
        assert revoked.status_code == 200
        stopped, batches = asyncio.get_running_loop().time(), gateway.app.state.batches
        while (record := await batches.batch(batch.id)).status != "cancelled":
            assert asyncio.get_running_loop().time() - stopped < 1.0, record.status
            await asyncio.sleep(0.02)
        served = gateway.workers[0].engine.batches
        await asyncio.sleep(0.5)
        assert gateway.workers[0].engine.batches <= served + 1  # nothing more of it runs
        error_file = await batches.file(record.doc["error_file_id"])
        errors = [orjson.loads(line) async for line in _lines(batches, error_file)]
    counts = record.doc["request_counts"]
    assert 10 <= counts["completed"] < 2000 and counts["completed"] + counts["failed"] == 2000
    assert record.doc["errors"]["data"][0]["code"] == "api_key_revoked"
    assert len(errors) == counts["failed"] and {e["error"]["code"] for e in errors} == {"api_key_revoked"}


async def _lines(store, record):
    async for chunk in store.results(record.batch_id, record.ok, 2000):
        for _, line in chunk:
            yield line


@pytest.mark.parametrize("default", [False, True], ids=["EMBEDQ_DATA_DIR", "the-default-under-HOME"])
def test_a_second_gateway_process_on_a_held_data_directory_exits_with_one_line(tmp_path, default: bool):
    where = tmp_path / ".local/share/embedq" if default else tmp_path
    held = DirStore.lock(where)  # what a running gateway (make run) holds
    try:
        chosen = {"HOME": str(tmp_path)} if default else {"EMBEDQ_DATA_DIR": str(tmp_path)}
        env = {**{k: v for k, v in os.environ.items() if k != "EMBEDQ_DATA_DIR"}, **chosen, "EMBEDQ_PORT": "1"}  # not bound
        done = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: another gateway uses the data directory") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_concurrent_batches_never_take_an_interactive_requests_room_in_the_queue():
    """Each batch's window is a quarter of the queue's request bound: eight batches filled the
    whole bound, and clients got 429. Bulk requests count against the bound; others only count
    their own class and more urgent ones."""
    async with running() as gateway:
        await gateway.worker(delay_s=0.5)  # 64 inputs a call: each batch keeps 128 lines queued
        oai = client(gateway)
        for b in range(8):
            await start(oai, [request_line(f"b{b}-{i}", f"batch {b} text {i}") for i in range(300)])
        bound = gateway.app.state.settings.max_queued_requests
        load = gateway.app.state.service._load
        await gateway.until(
            lambda: "fake-model" in load and load["fake-model"].requests >= bound, "the batches to fill the bound"
        )
        response = await asyncio.wait_for(gateway.embed("an interactive query"), 10)
    assert response.status_code == 200, response.text


async def test_lines_are_billed_with_their_results_so_a_line_run_again_is_billed_once():
    """The store fails to record the first results (Redis away): those lines run again when the
    batch is taken up again. Usage used to count them at their answer, so twice."""
    async with running({"EMBEDQ_ADMIN_TOKENS": ADMIN}) as gateway:
        await gateway.worker()
        store = gateway.app.state.batches
        record, failures = store.record, [OSError("the store is unreachable")]

        async def record_failing_once(batch_id, lines):
            if failures:
                raise failures.pop()
            return await record(batch_id, lines)

        store.record = record_failing_once
        oai = client(gateway)
        _, batch = await start(oai, [request_line(f"line-{i}", f"text number {i}") for i in range(40)])
        done = await finished(oai, batch.id, timeout_s=30)
        output = [orjson.loads(line) for line in (await oai.files.content(done.output_file_id)).content.splitlines()]
        usage = await gateway.client.get("/admin/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"})
    told = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in output)
    assert done.status == "completed" and len(output) == 40 and not failures
    (row,) = usage.json()["data"]
    assert (row["batch_requests"], row["batch_prompt_tokens"]) == (40, told), row
    assert done.usage.input_tokens == told


async def test_a_stale_driver_cannot_take_a_batch_back_from_completed_nor_record_a_line_again():
    """Two drivers of one batch (one stale, while Redis was away): the record of the one that
    ended it stands, and a line already recorded is neither written nor billed again."""
    async with running() as gateway:
        await gateway.worker()
        oai = client(gateway)
        _, batch = await start(oai, [request_line(f"line-{i}", f"text {i}") for i in range(3)])
        assert (await finished(oai, batch.id)).status == "completed"
        store = gateway.app.state.batches
        record = await store.batch(batch.id)
        stale = dataclasses.replace(record, doc={**record.doc, "status": "in_progress"})
        with pytest.raises(BatchEnded):
            await store.save_batch(stale)
        written = await store.record(batch.id, [(0, True, b"{}\n", 3), (7, True, b"{}\n", 3)])
        assert (await store.batch(batch.id)).status == "completed" and written == {7}


async def test_a_batch_past_its_completion_window_expires_with_its_unrun_lines_in_the_error_file(monkeypatch):
    monkeypatch.setitem(api.WINDOW_S, "24h", 1)  # a window that ends a second after it starts
    async with running() as gateway:
        await gateway.worker(delay_s=0.05, max_num_seqs=2)
        oai = client(gateway)
        lines = [request_line(f"line-{i}", f"text {i}") for i in range(1000)]
        uploaded, batch = await start(oai, lines)
        done = await finished(oai, batch.id, timeout_s=10)
        assert done.status == "expired" and done.expired_at is not None
        counts = done.request_counts
        assert 0 < counts.completed < 1000 and counts.completed + counts.failed == 1000
        output = (await oai.files.content(done.output_file_id)).content.splitlines()
        errors = [orjson.loads(line) for line in (await oai.files.content(done.error_file_id)).content.splitlines()]
        assert len(output) == counts.completed and len(errors) == counts.failed
        assert {e["error"]["code"] for e in errors} == {"batch_expired"} and all(e["response"] is None for e in errors)
        ran = {orjson.loads(line)["custom_id"] for line in output}
        assert ran.isdisjoint(e["custom_id"] for e in errors)


async def test_a_batch_whose_input_file_was_deleted_fails_when_it_is_taken_up_again(tmp_path):
    env = {"EMBEDQ_DATA_DIR": str(tmp_path / "data")}
    async with running(env) as gateway:
        await gateway.worker(delay_s=0.05, max_num_seqs=2)
        oai = client(gateway)
        lines = [request_line(f"line-{i}", f"text {i}") for i in range(500)]
        uploaded, batch = await start(oai, lines)
        while (await oai.batches.retrieve(batch.id)).request_counts.completed < 4:
            await asyncio.sleep(0.02)
        await oai.files.delete(uploaded.id)
    async with running(env) as gateway:
        done = await finished(client(gateway), batch.id)
        assert done.status == "failed" and done.errors is not None
        assert done.errors.data[0].code == "file_not_found"


@pytest.mark.parametrize("name", ["отчёт.jsonl", "📄.jsonl", 'a"b\r\nSet-Cookie: x=1.jsonl'])
async def test_a_file_of_any_name_downloads_under_that_name_and_injects_no_header(name):
    async with running() as gateway:
        oai = client(gateway)
        uploaded = await oai.files.create(file=(name, io.BytesIO(jsonl([request_line("a", "x")]))), purpose="batch")
        download = await gateway.client.get(f"/v1/files/{uploaded.id}/content")
    assert download.status_code == 200 and "set-cookie" not in download.headers
    disposition = download.headers["content-disposition"]
    assert disposition.isascii() and "\n" not in disposition and disposition.count('"') == 2
    assert urllib.parse.unquote(disposition.partition("filename*=UTF-8''")[2]) == uploaded.filename


async def test_files_and_batches_are_deleted_past_their_retention_with_what_they_own():
    """Uploads expire as their client asked (capped by the gateway's retention), output files as
    their batch asked, from when it ended; a batch, with all it left, the retention after it ended;
    an input file a running batch reads stays until it ends. Each deletion takes what it owns."""
    day = 86400
    async with running({"EMBEDQ_FILE_RETENTION_S": str(day)}) as gateway:
        await gateway.worker()
        oai, store, retention = client(gateway), gateway.app.state.batches, gateway.app.state.batch_retention
        content = io.BytesIO(jsonl([request_line("a", "text"), request_line("bad", "")]))
        hour = await oai.files.create(file=("in.jsonl", content), purpose="batch",
                                      expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
        assert hour.expires_at == hour.created_at + 3600
        capped = await oai.files.create(file=("in.jsonl", io.BytesIO(b"{}")), purpose="batch",
                                        expires_after={"anchor": "created_at", "seconds": 30 * day})  # fmt: skip
        assert capped.expires_at == capped.created_at + day
        batch = await oai.batches.create(input_file_id=hour.id, endpoint="/v1/embeddings", completion_window="24h",
                                         output_expires_after={"anchor": "created_at", "seconds": 2 * 3600})  # fmt: skip
        done = await finished(oai, batch.id)
        assert done.status == "completed" and done.request_counts.completed == done.request_counts.failed == 1
        output, errors = await oai.files.retrieve(done.output_file_id), await oai.files.retrieve(done.error_file_id)
        assert output.expires_at == errors.expires_at == done.completed_at + 2 * 3600, (output, done)

        assert await retention.sweep(hour.expires_at + GRACE_S - 1) == (0, 0)
        assert await retention.sweep(hour.expires_at + GRACE_S) == (1, 0)  # the input: its batch has ended
        with pytest.raises(openai.NotFoundError):
            await oai.files.retrieve(hour.id)
        assert await retention.sweep(output.expires_at) == (2, 0)
        assert await store.counts(batch.id) == (0, 0, 0, 0)  # the answers both files were read from
        assert (await oai.batches.retrieve(batch.id)).status == "completed"
        assert await retention.sweep(done.completed_at + day + GRACE_S) == (1, 1)  # the capped upload, and the batch
        with pytest.raises(openai.NotFoundError):
            await oai.batches.retrieve(batch.id)
        assert (await oai.files.list()).data == [] and (await oai.batches.list()).data == []


async def test_a_running_batch_keeps_its_expired_input_and_a_deleted_output_file_its_answers_go_too():
    async with running() as gateway:
        await gateway.worker(delay_s=0.05, max_num_seqs=2)
        oai, store, retention = client(gateway), gateway.app.state.batches, gateway.app.state.batch_retention
        content = io.BytesIO(jsonl([request_line(f"line-{i}", f"text {i}") for i in range(60)]))
        uploaded = await oai.files.create(file=("in.jsonl", content), purpose="batch",
                                          expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        while (await oai.batches.retrieve(batch.id)).status != "in_progress":
            await asyncio.sleep(0.02)
        assert await retention.sweep(uploaded.expires_at + GRACE_S) == (0, 0)  # read while the batch runs
        done = await finished(oai, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 60
        assert (await store.counts(batch.id))[0] == 60
        await oai.files.delete(done.output_file_id)
        assert await store.counts(batch.id) == (0, 0, 0, 0)
        assert await retention.sweep(uploaded.expires_at + GRACE_S) == (1, 0)  # the batch has ended: its input goes


async def test_an_expired_file_is_gone_for_clients_before_the_sweep_and_what_came_before_expiry_is_not_swept_at_once():
    async with running() as gateway:
        await gateway.worker()
        oai, store, retention = client(gateway), gateway.app.state.batches, gateway.app.state.batch_retention
        uploaded = await oai.files.create(file=("in.jsonl", io.BytesIO(jsonl([request_line("a", "text")]))), purpose="batch")
        record = await store.file(uploaded.id)
        await store.put_file(dataclasses.replace(record, expires_at=record.created_at - 1), None)  # expired a second ago
        create = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        for call in (oai.files.retrieve(uploaded.id), oai.files.content(uploaded.id), create):
            with pytest.raises(openai.NotFoundError):
                await call
        assert (await oai.files.list()).data == []
        # A file kept before files expired (no expires_at), uploaded 60 days ago: counted from then.
        since = await store.retention_since(0)
        old = FileRecord("file-old", "", "batch", "old.jsonl", 2, since - 60 * 86400, await store.next_seq())
        await store.put_file(old, io.BytesIO(b"{}"))
        assert await retention.sweep(since + GRACE_S) == (1, 0)  # the expired upload
        assert (await oai.files.retrieve("file-old")).id == "file-old"
        assert await retention.sweep(since + retention.retention_s + GRACE_S) == (1, 0)


async def test_odd_expiry_form_fields_are_400s():
    async with running() as gateway:
        content = {"file": ("in.jsonl", jsonl([request_line("a", "text")]))}
        for fields in ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "²"},
                       {"expires_after": "x", "expires_after[seconds]": "3600"}):  # fmt: skip
            response = await gateway.client.post("/v1/files", data={"purpose": "batch", **fields}, files=content)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"].startswith("expires_after"), response.text


@pytest.mark.parametrize(
    ("call", "param"),
    [
        ("upload", "expires_after.seconds"),
        ("upload_anchor", "expires_after.anchor"),
        ("batch", "output_expires_after.seconds"),
    ],
)
async def test_an_expiry_outside_openais_bounds_is_a_400_naming_the_field(call: str, param: str):
    async with running() as gateway:
        await gateway.worker()
        oai = client(gateway)
        content = ("in.jsonl", io.BytesIO(jsonl([request_line("a", "text")])))
        with pytest.raises(openai.BadRequestError) as wrong:
            if call == "upload":
                await oai.files.create(file=content, purpose="batch", expires_after={"anchor": "created_at", "seconds": 60})
            elif call == "upload_anchor":
                await oai.files.create(file=content, purpose="batch", expires_after={"anchor": "now", "seconds": 3600})  # type: ignore[typeddict-item]
            else:
                uploaded = await oai.files.create(file=content, purpose="batch")
                await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                         output_expires_after={"anchor": "created_at", "seconds": 10})  # fmt: skip
        assert wrong.value.param == param, wrong.value
        assert wrong.value.status_code == 400


async def test_answers_are_kept_as_float32_and_download_as_the_v1_embeddings_answer_byte_for_byte():
    """A line's vectors are kept as float32 (4 bytes a value, where JSON takes ~11), rendered when
    the file is downloaded; the file's ``bytes`` is what the download has. An answer kept as its
    JSON line (by a gateway from before frames) still downloads as it was."""
    async with running() as gateway:
        await gateway.worker()
        oai, store = client(gateway), gateway.app.state.batches
        texts = [[f"text {i} {j}" for j in range(8)] for i in range(20)]
        lines = [request_line(f"line-{i}", t, encoding_format="base64" if i % 2 else "float") for i, t in enumerate(texts)]
        _, batch = await start(oai, lines)
        done = await finished(oai, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 20
        downloaded = (await oai.files.content(done.output_file_id)).content
        assert (await oai.files.retrieve(done.output_file_id)).bytes == len(downloaded)
        for i, line in enumerate(downloaded.splitlines()):
            direct = await gateway.client.post("/v1/embeddings", json=lines[i]["body"])
            assert orjson.loads(line)["response"]["body"] == direct.json(), i
        kept = [answer async for chunk in store.results(batch.id, True, 20) for _, answer in chunk]
        values = 8 * len(expected(["x"])[0])
        assert all(4 * values <= len(answer) <= 4 * values + 200 for answer in kept), [len(a) for a in kept]
        assert sum(map(len, kept)) < len(downloaded) / 2
        legacy = b'{"id": "batch_req_old", "custom_id": "old", "response": {"status_code": 200}, "error": null}\n'
        await store.record(batch.id, [(20, True, legacy, len(legacy))])
        fake = dataclasses.replace(await store.batch(batch.id))
        fake.doc["request_counts"]["total"] = 21
        await store.save_batch(fake)
        assert (await oai.files.content(done.output_file_id)).content == downloaded + legacy
