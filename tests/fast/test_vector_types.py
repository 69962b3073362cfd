"""Vectors in the types vector databases store (``gateway/vectors.py``), in process: Cohere's
``/v2/embed`` through the ``cohere`` client, OpenAI's ``output_dtype`` through the ``openai``
client, batch lines, and the ranges int8 is made with, checked against sentence-transformers'
own quantization. (Real vLLM: tests/system/test_e2e_vllm.py.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import cohere
import httpx
import numpy as np
import openai
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from gateway.batches.frames import MAGIC
from gateway.redis_link import READS_FRAMES
from gateway.vectors import CALIBRATION_TEXTS, calibration_texts
from tests.fast.conftest import URL, Gateway, running
from tests.fast.test_batches import finished, request_line, start
from worker.config import FakeGenerator
from worker.engines import FakeEngine

pytestmark = pytest.mark.anyio
DIMS, MRL = 64, "matryoshka_dimensions = [16, 32]"
TEXTS = ["Why is the sky blue?", "Why is the grass green?", "Stocks fell sharply today.", "A cat sat on the mat."]


@contextlib.asynccontextmanager
async def cohere_client(gateway: Gateway):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL, timeout=30)
    async with cohere.AsyncClientV2(api_key="unused", base_url=URL, httpx_client=http) as client:
        yield client


async def floats(gateway: Gateway, texts: list[str], **fields) -> np.ndarray:
    response = await gateway.embed(texts, **fields)
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


async def calibration(gateway: Gateway, **fields) -> np.ndarray:
    """The model's vectors of the calibration corpus, asked for as any client would."""
    return await floats(gateway, calibration_texts(), truncate=True, **fields)


@pytest.mark.parametrize("size", [None, 32])
async def test_cohere_embed_gives_every_type_in_one_call_as_sentence_transformers_quantizes_the_floats(size):
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS, model_extra=MRL)
        async with cohere_client(gateway) as client:
            got = await client.embed(model="fake-model", input_type="search_document", texts=TEXTS, output_dimension=size,
                                     embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"])  # fmt: skip
        sized = {"dimensions": size} if size else {}
        reference = await floats(gateway, TEXTS, input_type="search_document", **sized)
        calibrated = await calibration(gateway, **sized)
    assert got.response_type == "embeddings_by_type" and got.texts == TEXTS and got.meta.billed_units.input_tokens > 0
    kinds = got.embeddings
    assert np.array_equal(np.array(kinds.float_, dtype=np.float32), reference)
    decoded = [np.frombuffer(base64.b64decode(item), dtype="<f4") for item in kinds.base64]
    assert np.array_equal(np.array(decoded), reference)
    low, high = calibrated.min(axis=0), calibrated.max(axis=0)
    margin = (high - low) * np.float32(0.05)  # docs/api.md: the calibration's span, 5% wider each side
    ranges = np.vstack((low - margin, high + margin))
    for kind in ("int8", "uint8"):
        want = quantize_embeddings(reference, kind, ranges=ranges)
        assert np.array_equal(np.array(getattr(kinds, kind)), want), kind
    for kind in ("binary", "ubinary"):
        want = quantize_embeddings(reference, kind)
        assert np.array_equal(np.array(getattr(kinds, kind)), want) and want.shape[1] == (size or DIMS) // 8, kind


async def test_the_openai_client_gets_integer_vectors_for_an_output_dtype_and_the_ranges_they_were_made_with():
    """The client asks for base64 unless told otherwise and would read int8 bytes as float32:
    integers come as lists, which it passes through."""
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL, timeout=30)
        oai = openai.AsyncOpenAI(base_url=URL + "/v1", api_key="unused", http_client=http, max_retries=0)
        got = {kind: await oai.embeddings.create(model="fake-model", input=TEXTS, extra_body={"output_dtype": kind})
               for kind in ("int8", "ubinary")}  # fmt: skip
        reference = await floats(gateway, TEXTS)
        ranges = (await gateway.client.get("/v1/quantization/fake-model")).json()
        bad = await gateway.embed(TEXTS, output_dtype="int4")
    int8 = np.array([d.embedding for d in got["int8"].data])
    low_high = np.array([ranges["low"], ranges["high"]], dtype=np.float32)
    assert np.array_equal(int8, quantize_embeddings(reference, "int8", ranges=low_high))
    assert np.array_equal(np.array([d.embedding for d in got["ubinary"].data]), quantize_embeddings(reference, "ubinary"))
    assert ranges["dimensions"] == DIMS and ranges["calibration_texts"] == CALIBRATION_TEXTS
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "output_dtype"


async def test_a_models_ranges_are_calibrated_once_for_concurrent_requests_and_kept_across_a_restart(tmp_path):
    env = {"EMBEDQ_DATA_DIR": str(tmp_path)}
    async with running(env) as gateway:
        fake = await gateway.worker(dimensions=DIMS)
        answers = await asyncio.gather(*(gateway.embed(TEXTS[i % 4], output_dtype="int8") for i in range(6)))
        inputs = sum(len(call) for call in fake.engine.calls)
        first = (await gateway.client.get("/v1/quantization/fake-model")).json()
    assert all(a.status_code == 200 for a in answers) and inputs == CALIBRATION_TEXTS + 6  # one calibration for all six
    async with running(env) as gateway:
        fake = await gateway.worker(dimensions=DIMS)
        again = await gateway.embed(TEXTS[0], output_dtype="int8")
        assert sum(len(call) for call in fake.engine.calls) == 1  # the kept ranges: no calibration
        assert (await gateway.client.get("/v1/quantization/fake-model")).json() == first
    assert again.json()["data"][0]["embedding"] == answers[0].json()["data"][0]["embedding"]


async def test_a_batch_line_with_an_output_dtype_downloads_as_the_v1_embeddings_answer():
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL, timeout=30)
        oai = openai.AsyncOpenAI(base_url=URL + "/v1", api_key="unused", http_client=http, max_retries=0)
        lines = [request_line(f"l{i}", TEXTS, output_dtype=kind) for i, kind in enumerate(["int8", "binary", "float"])]
        _, batch = await start(oai, lines)
        done = await finished(oai, batch.id)
        downloaded = (await oai.files.content(done.output_file_id)).content.splitlines()
        for i, line in enumerate(downloaded):
            direct = await gateway.client.post("/v1/embeddings", json=lines[i]["body"])
            assert httpx.Response(200, content=line).json()["response"]["body"] == direct.json(), i
        kept = [answer async for chunk in gateway.app.state.batches.results(batch.id, True, 3) for _, answer in chunk]
    assert done.request_counts.completed == 3
    assert len(kept[0]) < len(TEXTS) * DIMS + 300 and len(kept[1]) < len(TEXTS) * DIMS // 8 + 300  # a byte, a bit a value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"texts": TEXTS, "embedding_types": ["float", "int4"]}, "embedding_types.1"),
        ({"texts": TEXTS, "embedding_types": []}, "embedding_types"),
        ({"texts": TEXTS, "truncate": "START"}, "truncate"),
        ({"texts": TEXTS, "truncate": "MIDDLE"}, "truncate"),
        ({"texts": TEXTS, "max_tokens": 8}, "max_tokens"),
        ({"texts": TEXTS, "output_dimension": 12}, "output_dimension"),
        ({"texts": TEXTS, "input_type": "image"}, "input_type"),
        ({"texts": TEXTS, "input_type": "sideways"}, "input_type"),
        ({"texts": TEXTS, "inputs": [{"content": [{"type": "text", "text": "x"}]}]}, "texts"),
        ({}, "texts"),
        ({"images": ["data:image/png;base64,AAAA"]}, "images"),
        ({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "inputs[0].content[0]"),
        ({"texts": ["fine", ""]}, "texts[1]"),
        ({"texts": ["fine", "word " * 100], "truncate": "NONE"}, "texts[1]"),
        ({"texts": "not a list"}, "texts"),
    ],
)
async def test_bad_cohere_embed_requests_are_400s_naming_the_field_in_cohere_shape(body: dict, param: str):
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS, model_extra=MRL, max_model_len=64)
        response = await gateway.client.post("/v2/embed", json={"model": "fake-model", **body})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"message"} and param in response.json()["message"], response.text


async def test_cohere_embed_joins_an_inputs_text_parts_and_cuts_over_long_texts_by_default():
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS, max_model_len=64)
        parts = {"content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}
        joined = await gateway.client.post("/v2/embed", json={"model": "fake-model", "inputs": [parts]})
        long = await gateway.client.post("/v2/embed", json={"model": "fake-model", "texts": ["word " * 100]})
        reference = await floats(gateway, ["first part\nsecond part", "word " * 100], truncate=True)
    assert joined.json()["texts"] == ["first part\nsecond part"]
    assert np.array_equal(np.array(joined.json()["embeddings"]["float"] + long.json()["embeddings"]["float"], "f4"), reference)


# -- sparse weights (SPLADE), TEI's /embed_sparse ------------------------------------------------


def fake_sparse(texts: list[str]) -> list[dict[int, float]]:
    """What a fake SPLADE worker weighs each token of these texts (worker/engines/fake.py)."""
    engine = FakeEngine(FakeGenerator(type="fake", task="sparse"))
    return [{int(i): float(row[i]) for i in np.nonzero(row)[0]} for row in engine.embed(engine.tokenize(texts))]


async def test_embed_sparse_answers_each_texts_nonzero_weights_by_token_id_in_teis_shape():
    async with running() as gateway:
        await gateway.worker(model="splade", generator_extra='task = "sparse"')
        await gateway.worker(dimensions=DIMS)  # a dense model beside it
        many = await gateway.client.post("/embed_sparse", json={"inputs": TEXTS[:2]})  # TEI's body: no model
        one = await gateway.client.post("/embed_sparse", json={"inputs": TEXTS[2], "model": "splade"})
        models = {m["id"]: m["tasks"] for m in (await gateway.client.get("/v1/models")).json()["data"]}
        dense_of_sparse = await gateway.embed(TEXTS, model="splade")
        sparse_of_dense = await gateway.client.post("/embed_sparse", json={"inputs": TEXTS, "model": "fake-model"})
        left = await gateway.client.post("/embed_sparse", json={"inputs": TEXTS, "truncation_direction": "Left"})
        empty = await gateway.client.post("/embed_sparse", json={"inputs": ["a", ""]})
        long = await gateway.client.post("/embed_sparse", json={"inputs": ["a", "word " * 100]})
    assert many.status_code == 200 and one.status_code == 200, many.text + one.text
    got = [{item["index"]: item["value"] for item in row} for row in many.json() + one.json()]
    want = fake_sparse(TEXTS[:3])
    assert [sorted(g) for g in got] == [sorted(w) for w in want] and all(
        np.allclose([g[i] for i in sorted(g)], [w[i] for i in sorted(w)], atol=1e-6) for g, w in zip(got, want)
    )
    assert [item["index"] for item in many.json()[0]] == sorted(item["index"] for item in many.json()[0])
    assert models == {"splade": ["sparse", "tokenize"], "fake-model": ["embed", "score", "tokenize"]}
    assert dense_of_sparse.status_code == 400 and dense_of_sparse.json()["error"]["param"] == "model"
    for response, field in ((sparse_of_dense, "model"), (left, "truncation_direction"), (empty, "inputs[1]"),
                            (long, "'inputs[1]'")):  # fmt: skip
        assert response.status_code == 400 and response.json()["error_type"] == "Validation", response.text
        assert field in response.json()["error"], response.text


async def test_embed_sparse_needs_a_model_where_several_sparse_models_are_served():
    async with running() as gateway:
        await gateway.worker(model="splade-a", generator_extra='task = "sparse"')
        await gateway.worker(model="splade-b", generator_extra='task = "sparse"')
        unnamed = await gateway.client.post("/embed_sparse", json={"inputs": "x"})
        named = await gateway.client.post("/embed_sparse", json={"inputs": "x", "model": "splade-b"})
    assert unnamed.status_code == 400 and "splade-a, splade-b" in unnamed.json()["error"], unnamed.text
    assert named.status_code == 200 and len(named.json()) == 1


async def test_while_a_replica_reads_no_integer_frames_a_lines_integers_are_kept_as_its_json_line(monkeypatch):
    """A rolling upgrade: a replica of the release before reads float32 frames only (READS 2)."""
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS)
        store = gateway.app.state.batches

        async def older_replica_alive() -> int:
            return READS_FRAMES

        monkeypatch.setattr(store, "fleet_reads", older_replica_alive)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(gateway.app), base_url=URL, timeout=30)
        oai = openai.AsyncOpenAI(base_url=URL + "/v1", api_key="unused", http_client=http, max_retries=0)
        lines = [request_line("int8", TEXTS, output_dtype="int8"), request_line("float", TEXTS)]
        _, batch = await start(oai, lines)
        done = await finished(oai, batch.id)
        kept = [answer async for chunk in store.results(batch.id, True, 2) for _, answer in chunk]
        downloaded = (await oai.files.content(done.output_file_id)).content.splitlines()
        direct = [(await gateway.client.post("/v1/embeddings", json=line["body"])).json() for line in lines]
    assert kept[0].startswith(b"{") and kept[1].startswith(MAGIC)
    assert [httpx.Response(200, content=line).json()["response"]["body"] for line in downloaded] == direct


async def test_odd_query_numbers_are_400s_naming_the_parameter():
    async with running() as gateway:
        await gateway.worker(dimensions=DIMS)
        answers = [await gateway.client.get(path) for path in ("/v1/quantization/fake-model?dimensions=²",
                   "/v1/quantization/fake-model?dimensions=" + "9" * 5000, "/v1/quantization/fake-model?dimensions=8",
                   "/v1/files?limit=²")]  # fmt: skip
    for answer, param in zip(answers, ["dimensions", "dimensions", "dimensions", "limit"]):
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


async def test_a_sparse_models_large_answers_reach_the_gateway_in_posts_it_takes():
    """200 inputs of a 30,522-token vocabulary are 24 MB of weights, over the 16 MiB body limit."""
    async with running() as gateway:
        await gateway.worker(model="splade", generator_extra='task = "sparse"', max_num_seqs=200)
        texts = [f"text number {i}" for i in range(200)]
        answer = await gateway.client.post("/embed_sparse", json={"inputs": texts})
    assert answer.status_code == 200, answer.text
    assert [{item["index"] for item in row} for row in answer.json()] == [set(w) for w in fake_sparse(texts)]


async def test_embed_sparse_with_no_model_waits_for_a_sparse_worker_then_says_503():
    async with running({"EMBEDQ_WORKER_WAIT_S": "0.5"}) as gateway:
        await gateway.worker(dimensions=DIMS)  # dense only
        started = asyncio.get_running_loop().time()
        answer = await gateway.client.post("/embed_sparse", json={"inputs": "x"})
        waited = asyncio.get_running_loop().time() - started
        long = await gateway.client.post("/embed_sparse", json={"inputs": ["x"], "model": "fake-model"})
    assert answer.status_code == 503 and answer.json()["error_type"] == "Unhealthy" and waited >= 0.5
    assert "Retry-After" in answer.headers and long.status_code == 400
