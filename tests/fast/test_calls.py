"""Every call real clients make, in process: Ollama's full surface, OpenAI's edges, rerank and
score (on an embedding model's cosine, and on a cross-encoder), prompts, tokenize, and inputs
longer than the context embedded in chunks. (The real client libraries and real vLLM are in the
system tier: tests/system/test_clients.py, tests/system/test_e2e_vllm.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import expected
from tests.fast.conftest import running
from worker.config import FakeGenerator
from worker.engines import FakeEngine

pytestmark = pytest.mark.anyio
PROMPTS = 'prompts = { query = "query: ", document = "passage: " }'


def unit(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def test_ollama_embeds_more_inputs_than_openai_allows():
    texts = [f"chunk {i} of a corpus" for i in range(3000)]
    async with running() as gateway:
        await gateway.worker()
        ollama = await gateway.client.post("/api/embed", json={"model": "fake-model", "input": texts})
        openai = await gateway.embed(texts)
    assert ollama.status_code == 200 and len(ollama.json()["embeddings"]) == 3000
    assert np.allclose(ollama.json()["embeddings"][2999], expected(texts[2999:])[0], atol=1e-6)
    assert openai.status_code == 400 and "2048" in openai.json()["error"]["message"]


@pytest.mark.parametrize(("asked", "length"), [(5, 5), (15, 15), (16, 16), (64, 16)])
async def test_ollama_cuts_dimensions_to_any_smaller_size_and_ignores_larger(asked, length):
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/api/embed", json={"model": "fake-model", "input": ["x"], "dimensions": asked})
    (vector,) = response.json()["embeddings"]
    assert len(vector) == length and np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    assert np.allclose(vector, unit(expected(["x"])[:, :length])[0], atol=1e-6)


async def test_ollama_show_ps_version_and_root_answer_as_ollama_does():
    async with running() as gateway:
        await gateway.worker()
        show = await gateway.client.post("/api/show", json={"model": "fake-model:latest"})
        ps = await gateway.client.get("/api/ps")
        version = await gateway.client.get("/api/version")
        root = await gateway.client.get("/")
        unknown = await gateway.client.post("/api/show", json={"model": "nope"})
    info = show.json()["model_info"]
    assert show.status_code == 200 and info["bert.embedding_length"] == 16 and info["bert.context_length"] == 64
    assert show.json()["capabilities"] == ["embedding"]
    assert [m["name"] for m in ps.json()["models"]] == ["fake-model:latest"] and ps.json()["models"][0]["expires_at"]
    assert version.json()["version"].count(".") == 2
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]


async def test_a_model_can_be_retrieved_and_says_what_it_serves():
    async with running() as gateway:
        await gateway.worker()
        one = await gateway.client.get("/v1/models/fake-model")
        listed = await gateway.client.get("/v1/models")
        missing = await gateway.client.get("/v1/models/nope")
    expected_model = {"id": "fake-model", "object": "model", "created": 0, "owned_by": "embedq",
                      "tasks": ["embed", "score", "tokenize"], "dimensions": 16, "max_input_tokens": 64,
                      "matryoshka_dimensions": [], "prompts": {}, "default_prompt": None, "normalized": True}  # fmt: skip
    assert one.json() | {"created": 0} == expected_model
    assert listed.json()["data"][0]["tasks"] == ["embed", "score", "tokenize"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/embeddings", {"model": "fake-model", "input": 5}), ("/api/embed", {"model": "fake-model", "input": 5}),
     ("/v1/rerank", {"model": "fake-model", "query": "q", "documents": "d"}),
     ("/score", {"model": 5, "text_1": "a", "text_2": "b"})],
)  # fmt: skip
async def test_a_field_of_the_wrong_type_is_a_400_naming_it(path, body):
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post(path, json=body)
    assert response.status_code == 400, response.text
    if not path.startswith("/api/"):
        assert response.json()["error"]["code"] == "invalid_type"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
async def test_a_jina_rerank_error_carries_jinas_detail_beside_our_error(path):
    """What LangChain's and LlamaIndex's JinaRerank and jina-haystack do with an answer without
    results: ``raise RuntimeError(resp["detail"])``; a KeyError there hides what was wrong."""
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post(path, json={"model": "no-such-model", "query": "q", "documents": ["d"]})
    payload = response.json()
    assert response.status_code == 404 and "results" not in payload
    assert payload["detail"] == payload["error"]["message"] and "no-such-model" in payload["detail"]


async def test_credentials_refused_in_openais_words(tmp_path):
    from gateway.tenancy.keys import SqliteKeyStore

    store = SqliteKeyStore(tmp_path / "keys.db")
    scoped, _ = store.create("scoped", ["other"], None)
    store.close()
    async with running({"EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        await gateway.worker()
        missing = await gateway.embed("x")
        wrong = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "x"},
                                          headers={"Authorization": "Bearer eq-wrong"})  # fmt: skip
        forbidden = await gateway.client.post("/v1/embeddings", json={"model": "fake-model", "input": "x"},
                                              headers={"Authorization": f"Bearer {scoped}"})  # fmt: skip
    for response in (missing, wrong):
        error = response.json()["error"]
        assert response.status_code == 401 and error["message"].startswith("Incorrect API key provided")
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"


async def test_rerank_ranks_by_an_embedding_models_cosine_in_jinas_and_cohere_shapes():
    documents = ["alpha beta", "gamma delta", "alpha beta gamma"]
    vectors = expected(["alpha beta", *documents])
    truth = [float(vectors[0] @ vectors[i + 1]) for i in range(3)]
    order = sorted(range(3), key=lambda i: truth[i], reverse=True)
    async with running() as gateway:
        await gateway.worker()
        mixed = [documents[0], {"text": documents[1]}, documents[2]]  # Jina's documents may be objects
        jina = await gateway.client.post("/v1/rerank", json={"model": "fake-model", "query": "alpha beta", "top_n": 2,
                                                              "documents": mixed})  # fmt: skip
        cohere = await gateway.client.post(
            "/v2/rerank", json={"model": "fake-model", "query": "alpha beta", "documents": documents}
        )
        bare = await gateway.client.post("/rerank", json={"model": "fake-model", "query": "alpha beta", "documents": documents,
                                                          "return_documents": False})  # fmt: skip
    results = jina.json()["results"]
    assert [r["index"] for r in results] == order[:2] and results[0]["document"]["text"] == documents[order[0]]
    assert np.allclose([r["relevance_score"] for r in results], [truth[i] for i in order[:2]], atol=1e-6)
    assert jina.json()["usage"]["total_tokens"] == 4 + 4 + 4 + 5  # the query once, each document once
    assert [r["index"] for r in cohere.json()["results"]] == order and "document" not in cohere.json()["results"][0]
    assert cohere.json()["meta"]["billed_units"]["search_units"] == 1
    assert "document" not in bare.json()["results"][0]


async def test_score_pairs_one_with_one_one_with_many_and_pairwise():
    async with running() as gateway:
        await gateway.worker()
        one = await gateway.client.post("/score", json={"model": "fake-model", "text_1": "a b", "text_2": "a b"})
        many = await gateway.client.post("/v1/score", json={"model": "fake-model", "text_1": "a", "text_2": ["a", "b", "c"]})
        pairwise = await gateway.client.post("/score", json={"model": "fake-model", "text_1": ["a", "b"], "text_2": ["b", "a"]})
        uneven = await gateway.client.post(
            "/score", json={"model": "fake-model", "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}
        )
    assert one.json()["data"][0]["score"] == pytest.approx(1.0, abs=1e-5)  # a text is most like itself
    assert [d["index"] for d in many.json()["data"]] == [0, 1, 2] and many.json()["object"] == "list"
    scores = [d["score"] for d in pairwise.json()["data"]]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)  # cosine is symmetric
    assert uneven.status_code == 400 and uneven.json()["error"]["param"] == "text_2"


async def test_a_cross_encoder_scores_pairs_itself_and_does_not_embed():
    async with running() as gateway:
        await gateway.worker("reranker", generator_extra='task = "score"', model_extra="embedding_task.supported = false")
        reranked = await gateway.client.post(
            "/v1/rerank", json={"model": "reranker", "query": "alpha", "documents": ["beta", "alpha"]}
        )
        embedded = await gateway.embed("x", model="reranker")
        model = (await gateway.client.get("/v1/models/reranker")).json()
    engine = FakeEngine(FakeGenerator(type="fake", dimensions=16, max_model_len=64, task="score"))
    truth, tokens = engine.score([("alpha", "beta"), ("alpha", "alpha")])
    results = reranked.json()["results"]
    assert [r["index"] for r in results] == [1, 0] and np.allclose(
        [r["relevance_score"] for r in results], truth[::-1], atol=1e-6
    )
    assert reranked.json()["usage"]["total_tokens"] == sum(tokens)
    assert embedded.status_code == 400 and embedded.json()["error"]["code"] == "unsupported_task"
    assert model["tasks"] == ["score", "tokenize"]


async def test_a_prompt_changes_the_vector_exactly_as_the_prefixed_text_and_counts_its_tokens():
    async with running() as gateway:
        await gateway.worker(model_extra=PROMPTS)
        prompted = await gateway.embed(["find me"], input_type="search_query")
        prefixed = await gateway.embed(["query: find me"])
        by_name = await gateway.embed(["find me"], prompt_name="document")
        unknown = await gateway.embed(["find me"], prompt_name="nope")
        ids = await gateway.embed([[101, 2000, 102]], input_type="search_query")
    assert prompted.json()["data"][0]["embedding"] == prefixed.json()["data"][0]["embedding"]
    assert prompted.json()["usage"]["prompt_tokens"] == prefixed.json()["usage"]["prompt_tokens"] == 5
    assert np.array_equal(np.array([by_name.json()["data"][0]["embedding"]], dtype=np.float32), expected(["passage: find me"]))
    assert unknown.status_code == 400 and "query" in unknown.json()["error"]["message"]
    assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]


async def test_tokenize_counts_what_embedding_counts_and_detokenize_reads_ids_back():
    async with running() as gateway:
        await gateway.worker(model_extra=PROMPTS)
        text = "how many tokens is this"
        tokens = await gateway.client.post("/tokenize", json={"model": "fake-model", "prompt": text})
        bare = await gateway.client.post("/tokenize", json={"model": "fake-model", "prompt": text, "add_special_tokens": False})
        prompted = await gateway.client.post("/tokenize", json={"model": "fake-model", "prompt": text, "prompt_name": "query"})
        embedded = await gateway.embed(text)
        back = await gateway.client.post("/detokenize", json={"model": "fake-model", "tokens": tokens.json()["tokens"]})
    assert tokens.json()["count"] == embedded.json()["usage"]["prompt_tokens"] == 7
    assert tokens.json()["max_model_len"] == 64 and len(tokens.json()["tokens"]) == 7
    assert bare.json()["count"] == 5 and prompted.json()["count"] == 8
    assert len(back.json()["prompt"].split()) == 5  # the fake's ids name themselves; special tokens left out


async def test_an_input_longer_than_the_context_is_embedded_in_chunks_when_the_model_says_so():
    long_text = " ".join(f"w{i}" for i in range(150))  # 152 tokens, for a 64-token model: 3 chunks
    async with running() as gateway:
        await gateway.worker(model_extra="chunk_long_inputs = true")
        chunked = await gateway.embed([long_text, "short"])
        cut = await gateway.embed([long_text], truncate=True)
    engine = FakeEngine(FakeGenerator(type="fake", dimensions=16, max_model_len=64))
    (ids,) = engine.tokenize([long_text])
    parts = engine.chunks(ids, 64)
    mean = np.average(engine.embed(parts), axis=0, weights=[len(p) for p in parts])
    got = np.array([d["embedding"] for d in chunked.json()["data"]], dtype=np.float32)
    assert [len(p) for p in parts] == [64, 64, 28]
    assert np.allclose(got[0], mean / np.linalg.norm(mean), atol=1e-6) and np.array_equal(got[1:], expected(["short"]))
    assert chunked.json()["usage"]["prompt_tokens"] == 152 + 3  # every token of the long input counts
    assert cut.json()["usage"]["prompt_tokens"] == 64


async def test_rerank_errors_name_the_document():
    async with running() as gateway:
        await gateway.worker()
        long_document = " ".join(["word"] * 100)
        response = await gateway.client.post("/v1/rerank", json={"model": "fake-model", "query": "q", "truncate": False,
                                                                  "documents": ["fine", long_document]})  # fmt: skip
        empty = await gateway.client.post("/v1/rerank", json={"model": "fake-model", "query": "q", "documents": ["a", ""]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "documents[1]", response.text
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "documents[1]"
