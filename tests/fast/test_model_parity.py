"""A served model behaves as the same model does in sentence-transformers: the prompt a request
asks for is applied or refused, never dropped; the model's own prompts and default prompt apply
without a line in config.toml; a model without a Normalize module gets its raw vectors on every
route, and cosines for its scores; ``--check`` refuses a ``max_model_len`` vLLM would refuse.
(Real vLLM on tiny seeded models: tests/system/test_model_parity_vllm.py.)"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from contract.messages import HeartbeatReply, ModelCard, WorkerHello
from tests.fakes import DIMS, MAX_LEN, expected
from tests.fast.conftest import running
from worker.__main__ import main as worker_main
from worker.client import GatewayClient
from worker.config import FakeGenerator, parse_config
from worker.engines import FakeEngine
from worker.metrics import WorkerMetrics
from worker.model_files import length_limit, served_prompts
from worker.runner import _model_cards

pytestmark = pytest.mark.anyio
ST_NAMED = 'prompts = { search_query = "Q: ", search_document = "D: " }'  # prompts named as input_types


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


async def test_a_prompt_named_as_an_input_type_is_applied_not_dropped():
    async with running() as gateway:
        await gateway.worker(model_extra=ST_NAMED)
        by_type = await gateway.embed(["find me"], input_type="search_query")
        by_name = await gateway.embed(["find me"], prompt_name="search_document")
        alias = await gateway.embed(["find me"], prompt_name="query")  # a prompt_name is the prompt's own name
    assert np.array_equal(vectors(by_type), expected(["Q: find me"]))
    assert np.array_equal(vectors(by_name), expected(["D: find me"]))
    assert alias.status_code == 400 and alias.json()["error"]["param"] == "prompt_name"
    assert "search_document, search_query" in alias.json()["error"]["message"]


async def test_a_prompt_name_the_model_lacks_is_a_400_and_an_input_type_it_lacks_embeds_the_text():
    async with running() as gateway:
        await gateway.worker()
        named = await gateway.embed(["find me"], prompt_name="query")
        typed = await gateway.embed(["find me"], input_type="search_query")
        unknown = await gateway.embed(["find me"], input_type="sideways")
    assert named.status_code == 400 and "has no prompt 'query'" in named.json()["error"]["message"]
    assert np.array_equal(vectors(typed), expected(["find me"]))
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "input_type"


async def test_the_default_prompt_goes_before_a_text_whose_request_names_none():
    prompts = 'prompts = { query = "query: ", document = "passage: " }\ndefault_prompt = "query"'
    async with running() as gateway:
        await gateway.worker(model_extra=prompts)
        plain = await gateway.embed(["find me"])
        named = await gateway.embed(["find me"], input_type="search_document")
        ids = await gateway.embed([[101, 2000, 102]])  # token ids are the client's own
        tokens = await gateway.client.post("/tokenize", json={"model": "fake-model", "prompt": "find me"})
        model = (await gateway.client.get("/v1/models/fake-model")).json()
    assert np.array_equal(vectors(plain), expected(["query: find me"]))
    assert np.array_equal(vectors(named), expected(["passage: find me"]))
    assert ids.status_code == 200 and ids.json()["usage"]["prompt_tokens"] == 3
    assert tokens.json()["count"] == plain.json()["usage"]["prompt_tokens"] == 5
    assert model["prompts"] == {"query": "query: ", "document": "passage: "} and model["default_prompt"] == "query"


def raw_engine(**options) -> FakeEngine:
    return FakeEngine(FakeGenerator(type="fake", dimensions=DIMS, max_model_len=MAX_LEN, normalize=False, **options))


async def test_a_model_without_normalize_gets_its_raw_vectors_on_every_route_and_cosines_for_scores():
    texts = ["alpha beta", "gamma", "alpha beta gamma"]
    engine = raw_engine()
    raw = engine.embed(engine.tokenize(texts))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # the fake's lengths are its own
    long_text = " ".join(f"w{i}" for i in range(150))  # three chunks of a 64-token model
    async with running() as gateway:
        await gateway.worker(
            generator_extra="normalize = false", model_extra="matryoshka_dimensions = [8]\nchunk_long_inputs = true"
        )
        openai = await gateway.embed(texts)
        cut = await gateway.embed(texts, dimensions=8)
        ollama = await gateway.client.post("/api/embed", json={"model": "fake-model", "input": texts, "dimensions": 5})
        scored = await gateway.client.post("/score", json={"model": "fake-model", "text_1": texts[0], "text_2": texts[1:]})
        chunked = await gateway.embed([long_text])
        model = (await gateway.client.get("/v1/models/fake-model")).json()
    assert np.allclose(vectors(openai), raw, atol=1e-6)
    assert np.allclose(vectors(cut), raw[:, :8], atol=1e-6)  # cut, not re-normalised: what the model gives
    assert np.allclose(ollama.json()["embeddings"], raw[:, :5], atol=1e-6)
    cosines = [float(raw[0] @ raw[i] / np.linalg.norm(raw[0]) / np.linalg.norm(raw[i])) for i in (1, 2)]
    assert np.allclose([d["score"] for d in scored.json()["data"]], cosines, atol=1e-6)
    parts = engine.chunks(engine.tokenize([long_text])[0], MAX_LEN)
    mean = np.average(engine.embed(parts), axis=0, weights=[len(p) for p in parts])
    assert np.allclose(vectors(chunked)[0], mean, atol=1e-5)
    assert model["normalized"] is False


def st_model(folder, **files) -> str:
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return str(folder)


def test_the_models_own_prompts_apply_and_config_toml_overrides_them_name_by_name(tmp_path):
    st = {"prompts": {"query": "task: search | query: ", "document": "title: none | text: "}, "default_prompt_name": "query"}
    path = st_model(tmp_path / "model", config_sentence_transformers=st)
    own = served_prompts(path, {}, None)
    mine = served_prompts(path, {"query": "q: "}, "")
    assert own.prompts == st["prompts"] and own.default == "query"
    assert mine.prompts == {"query": "q: ", "document": "title: none | text: "} and mine.default == ""
    assert served_prompts(str(tmp_path / "none"), {}, None).prompts == {}


def test_the_models_cards_carry_its_files_prompts_and_whether_it_normalises(tmp_path):
    path = st_model(tmp_path / "model", config_sentence_transformers={"prompts": {"query": "query: "}})
    config = parse_config(f"""
edition = 1
[generator]
type = "vllm"
model_path = "{path}"
[queue]
url = "http://127.0.0.1:1"
checkpoint_name = "m"
[queue.models."m"]
[queue.models."m2"]
prompts = {{ query = "mine: " }}
""")
    cards = _model_cards(config, raw_engine())
    assert cards["m"].prompts == {"query": "query: "} and cards["m2"].prompts == {"query": "mine: "}
    assert not cards["m"].normalized


@pytest.mark.parametrize(
    ("files", "tokens", "source"),
    [
        ({"config": {"max_position_embeddings": 512, "position_embedding_type": "absolute"},
          "sentence_bert_config": {"max_seq_length": 256}}, 256, "max_seq_length in sentence_bert_config.json"),
        ({"config": {"max_position_embeddings": 512, "position_embedding_type": "absolute"},
          "tokenizer_config": {"model_max_length": 128}}, 128, "model_max_length in tokenizer_config.json"),
        ({"config": {"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
         65536, "max_position_embeddings in config.json, times its RoPE factor 2"),
        ({"config": {"text_config": {"max_position_embeddings": 2048, "model_type": "gemma3_text"}}}, 2048,
         "max_position_embeddings in config.json"),
    ],
)  # fmt: skip
def test_the_longest_input_is_read_as_vllm_derives_it(tmp_path, files, tokens, source):
    limit = length_limit(st_model(tmp_path / "model", **files))
    assert limit is not None and (limit.tokens, limit.source) == (tokens, source)


def test_check_refuses_a_max_model_len_over_the_models_limit_with_one_line(tmp_path, capsys):
    path = st_model(tmp_path / "model", config={"max_position_embeddings": 512, "position_embedding_type": "absolute"},
                    sentence_bert_config={"max_seq_length": 256})  # fmt: skip
    config = tmp_path / "config.toml"
    body = f"""
edition = 1
[generator]
type = "vllm"
model_path = "{path}"
max_model_len = {{}}
[queue]
url = "http://127.0.0.1:1"
checkpoint_name = "m"
[queue.models."m"]
"""
    config.write_text(body.format(512))
    refused = worker_main(["--config", str(config), "--check"])
    errors = capsys.readouterr().err
    config.write_text(body.format(256))
    passed = worker_main(["--config", str(config), "--check"])
    resolved = json.loads(capsys.readouterr().out)
    assert refused == 2 and errors.count("error:") == 1
    assert "generator.max_model_len: 512 is over the 256 tokens" in errors and "sentence_bert_config.json" in errors
    assert passed == 0 and resolved["resolved"]["model_max_len"]["tokens"] == 256


async def test_a_worker_speaking_protocol_2_leaves_out_what_that_gateway_does_not_know():
    seen: list[dict] = []

    def old_gateway(request: httpx.Request) -> httpx.Response:
        hello = json.loads(request.content)
        seen.append(hello)
        if hello["protocol"] != 2 or any({"normalized", "default_prompt"} & set(card) for card in hello["models"].values()):
            return httpx.Response(400, json={"error": {"message": "protocol: input should be 2"}})
        return httpx.Response(200, content=HeartbeatReply(protocol=2, worker_ttl_s=15, lease_ttl_s=30).model_dump_json())

    client = GatewayClient("http://gw", "", 0, 5, WorkerMetrics(CollectorRegistry()), transport=httpx.MockTransport(old_gateway))
    card = ModelCard(max_input_tokens=64, dimensions=16, prompts={"query": "q: "}, default_prompt="query", normalized=False)
    hello = WorkerHello(worker_id="w1", checkpoint_name="m", models={"m": card}, max_batch_items=8)
    reply = await client.heartbeat(hello)
    await client.aclose()
    assert reply.protocol == 2 and client.protocol == 2 and len(seen) == 2
    assert seen[0]["models"]["m"]["normalized"] is False and "normalized" not in seen[1]["models"]["m"]
