"""Nothing a worker sends is trusted: answers are checked against their jobs before any client sees
them, a worker is who it registered as only with its session secret, and a model's card is pinned
by the workers serving it. Hostile workers here speak the protocol by hand; broken ones are the
real runner on a fake engine that answers wrongly."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from contract.messages import RESULTS_CONTENT_TYPE, SESSION_HEADER
from tests.fakes import expected, metric
from tests.fast.conftest import Gateway, HandWorker, running

pytestmark = pytest.mark.anyio


def right(job: dict) -> np.ndarray:
    return expected(job["inputs"])


async def _answered_by_a_healthy_worker_after(gateway: Gateway, request: asyncio.Task, texts: list[str]) -> None:
    """The refused jobs went back in line: a healthy worker answers them, with the right vectors."""
    await gateway.worker()
    response = await asyncio.wait_for(request, 10)
    assert response.status_code == 200, response.text
    got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    assert np.array_equal(got, expected(texts))


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda job: right(job)[:1], id="one-row-for-two"),
        pytest.param(lambda job: np.vstack([right(job), right(job)[:1]]), id="three-rows-for-two"),
        pytest.param(lambda job: right(job)[:, :8], id="8-of-16-dimensions"),
        pytest.param(lambda job: np.where(np.arange(16) == 3, np.nan, right(job)).astype(np.float32), id="nan"),
        pytest.param(lambda job: np.where(np.arange(16) == 3, np.inf, right(job)).astype(np.float32), id="infinity"),
    ],
)
async def test_an_answer_that_does_not_fit_its_job_is_refused_and_the_job_goes_back(wrong):
    texts = ["first input", "second input"]
    async with running() as gateway:
        hand = HandWorker(gateway)
        assert (await hand.register()).status_code == 200
        request = asyncio.create_task(gateway.embed(texts))
        (job,) = await hand.lease()
        matrix = wrong(job)
        reply = await hand.post([(job, matrix, [3] * matrix.shape[0])])
        assert reply.json() == {"accepted": 0, "ignored": 1}
        await _answered_by_a_healthy_worker_after(gateway, request, texts)
        metrics = await gateway.metrics()
    assert metric(metrics, 'embedq_gateway_worker_posts_total{result="refused"}') == 1


async def test_an_off_by_one_worker_never_hands_a_client_a_neighbours_vector():
    """Jobs of 32 and 8 inputs answered with 31 and 9 rows: the 32nd input's vector would be the
    next job's first. Both are refused; the client gets every vector for its own text."""
    texts = [f"input {i}" for i in range(40)]
    async with running() as gateway:
        hand = HandWorker(gateway)
        await hand.register()
        request = asyncio.create_task(gateway.embed(texts))
        first, second = await hand.lease()
        together = np.vstack([right(first), right(second)])
        reply = await hand.post([(first, together[:31], [3] * 31), (second, together[31:], [3] * 9)])
        assert reply.json() == {"accepted": 0, "ignored": 2}
        await _answered_by_a_healthy_worker_after(gateway, request, texts)


@pytest.mark.parametrize("count", [0, 65], ids=["zero", "over-the-context"])
async def test_token_counts_outside_the_models_context_are_refused(count):
    async with running() as gateway:
        hand = HandWorker(gateway)
        await hand.register()
        request = asyncio.create_task(gateway.embed("counted"))
        (job,) = await hand.lease()
        assert (await hand.post([(job, right(job), [count])])).json()["ignored"] == 1
        await _answered_by_a_healthy_worker_after(gateway, request, ["counted"])


@pytest.mark.parametrize(
    "long, plain, entries",
    [("fake-model", "plain", 'chunk_long_inputs = true\n[queue.models."plain"]\n'),
     ("long", "fake-model", '[queue.models."long"]\nchunk_long_inputs = true\n')],
    ids=["chunked-first", "chunked-second"],
)  # fmt: skip
async def test_a_worker_serving_a_chunked_and_a_plain_model_on_one_checkpoint_serves_both(long, plain, entries):
    """Its answers carry no model name: the chunked one's over-long inputs count more tokens than
    the engine's context, which must not make every answer of the worker wrong."""
    async with running() as gateway:
        await gateway.worker(model_extra=entries)
        chunked = await gateway.embed(["word " * 300, "short"], model=long)
        refused = await gateway.embed(["word " * 300], model=plain)
        fits = await gateway.embed(["short"], model=plain)
    assert chunked.status_code == 200 and chunked.json()["usage"]["prompt_tokens"] > 300, chunked.text
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert fits.status_code == 200


@pytest.mark.parametrize("count", [-5, 2**70], ids=["negative", "2**70"])
async def test_absurd_token_counts_are_a_bad_frame_not_a_500(count):
    async with running() as gateway:
        hand = HandWorker(gateway)
        await hand.register()
        request = asyncio.create_task(gateway.embed("counted"))
        (job,) = await hand.lease()
        result = {"job_id": job["job_id"], "lease_id": job["lease_id"], "rows": 1, "dims": 16, "prompt_tokens": [count]}
        header = json.dumps({"worker_id": "hand", "results": [result]}).encode()  # what pydantic would never send
        frame = len(header).to_bytes(4, "little") + header + right(job).astype("<f4").tobytes()
        reply = await hand.call("/results", content=frame, headers={"Content-Type": RESULTS_CONTENT_TYPE})
        assert reply.status_code == 400 and "prompt_tokens" in reply.text
        await _answered_by_a_healthy_worker_after(gateway, request, ["counted"])  # after its lease (1 s) ran out


async def test_another_worker_cannot_answer_give_back_or_leave_for_the_holder():
    async with running({"EMBEDQ_LEASE_TTL_S": "2"}) as gateway:
        holder, other = HandWorker(gateway, "holder"), HandWorker(gateway, "other")
        await holder.register()
        await other.register()
        request = asyncio.create_task(gateway.embed("mine"))
        (job,) = await holder.lease(hold_s=30)
        stolen = await other.post([(job, right(job) * 0 + 0.25, [3])], worker_id="other")  # under holder's lease
        assert stolen.json() == {"accepted": 0, "ignored": 1}
        impersonated = await other.post([(job, right(job), [3])], worker_id="holder")  # holder's id, not its session
        assert impersonated.status_code == 403 and impersonated.json()["error"]["code"] == "worker_session"
        release = {"worker_id": "holder", "jobs": [{"job_id": job["job_id"], "lease_id": job["lease_id"]}]}
        assert (await other.call("/release", json=release)).status_code == 403
        assert (await other.call("/workers/leave", json={"worker_id": "holder"})).status_code == 403
        assert (await other.register()).status_code == 200  # its own id is still its own
        assert (await HandWorker(gateway, "holder").register()).status_code == 403  # holder's id is taken
        assert (await holder.post([(job, right(job), [3])])).json() == {"accepted": 1, "ignored": 0}
        response = await request
    assert np.array_equal(np.array([response.json()["data"][0]["embedding"]], dtype=np.float32), expected(["mine"]))


async def test_a_model_is_served_by_one_checkpoint_with_one_card(caplog):
    async with running() as gateway:
        assert (await HandWorker(gateway, "a", checkpoint="ckpt-a").register()).status_code == 200
        assert (await HandWorker(gateway, "b", checkpoint="ckpt-a").register()).status_code == 200  # a replica: fine
        other_checkpoint = await HandWorker(gateway, "c", checkpoint="ckpt-c").register()
        other_dims = await HandWorker(gateway, "d", checkpoint="ckpt-a", dims=8).register()
        models = (await gateway.client.get("/v1/models")).json()["data"]
    for refused in (other_checkpoint, other_dims):
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_conflict", refused.text
    assert "ckpt-a" in other_checkpoint.json()["error"]["message"] and "ckpt-c" in other_checkpoint.json()["error"]["message"]
    assert "16 dimensions" in other_dims.json()["error"]["message"] and "8 dimensions" in other_dims.json()["error"]["message"]
    logged = [r.getMessage() for r in caplog.records if "refused worker c" in r.getMessage()]
    assert logged and "ckpt-a" in logged[0] and "ckpt-c" in logged[0], caplog.text  # one line naming both
    assert [m["id"] for m in models] == ["fake-model"]


@pytest.mark.parametrize("worker_id", ["w\nFAKE LOG LINE", "x" * 4096, "", "w x"], ids=["newline", "4-KiB", "empty", "space"])
async def test_worker_ids_are_short_and_printable(worker_id, caplog):
    async with running() as gateway:
        response = await HandWorker(gateway, worker_id).register()
    assert response.status_code == 400 and "worker_id" in response.json()["error"]["message"]
    assert len(caplog.text) < 10_000 and "FAKE LOG LINE" not in caplog.text


async def test_a_worker_call_without_its_session_secret_is_refused():
    async with running() as gateway:
        hello = {"worker_id": "w", "checkpoint_name": "m", "max_batch_items": 8,
                 "models": {"m": {"max_input_tokens": 64, "dimensions": 16}}}  # fmt: skip
        response = await gateway.client.post("/internal/v1/workers/heartbeat", json=hello)
    assert response.status_code == 400 and SESSION_HEADER in response.json()["error"]["message"]


@pytest.mark.parametrize("wrong", ["nan", "dims", "rows"])
async def test_a_broken_worker_beside_a_healthy_one_costs_clients_nothing_and_sits_out(wrong):
    async with running() as gateway:
        broken = await gateway.worker(delay_s=0.02, generator_extra=f'wrong = "{wrong}"')
        await gateway.worker(delay_s=0.02)
        requests: list[list[str]] = []
        results = []
        for round_ in range(10):  # rounds of 8 concurrent requests, until the broken worker sits out
            batch = [[f"c{c} r{round_} i{i}" for i in range(3)] for c in range(8)]
            requests += batch
            results += await asyncio.gather(*(gateway.embed(texts) for texts in batch))
            if gateway.app.state.workers.state(broken.id) == "faulty":
                break
        state = gateway.app.state.workers.state(broken.id)
        metrics = await gateway.metrics()
    statuses = [r.status_code for r in results]
    refused = metric(metrics, 'embedq_gateway_worker_posts_total{result="refused"}')
    wrong = sum(
        not np.array_equal(np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32), expected(texts))
        for r, texts in zip(results, requests)
        if r.status_code == 200
    )
    summary = f"statuses {sorted(set(statuses))}, {wrong} with wrong vectors, {refused:g} answers refused, broken worker {state}"
    assert statuses == [200] * len(requests) and wrong == 0, summary
    assert refused >= 1 and state == "faulty", summary
