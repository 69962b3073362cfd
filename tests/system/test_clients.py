"""The real client libraries against a running gateway and fake-engine workers.

openai, ollama and aleph-alpha-client each talk to the gateway exactly as they would to their
own vendor's server; every dialect must give the same vectors for the same text.
"""

from __future__ import annotations

import re
import time

import httpx
import numpy as np
import ollama
import openai
import pytest
from aleph_alpha_client import Client as AlephAlphaClient
from aleph_alpha_client import EmbeddingV2Request

from tests.system.conftest import Cluster, fake_worker_config, free_port, wait_until

MODEL, MRL = "fake-model", "mrl"
DIMS, MAX_LEN = 16, 64
TEXTS = ["Why is the sky blue?", "Why is the grass green?"]
LONG = "word " * 100  # 102 tokens with the fake tokenizer, over MAX_LEN


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """MODEL on an untagged worker and on one tagged gpu-a; MRL is Matryoshka and truncates."""
    cluster = Cluster(tmp_path_factory.mktemp("clients"))
    gateway = cluster.gateway()
    gateway.ports = {"plain": free_port(), "gpu-a": free_port()}
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, metrics_port=gateway.ports["plain"]))
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, metrics_port=gateway.ports["gpu-a"], tags=("gpu-a",)))
    cluster.worker(
        fake_worker_config(gateway.url, MRL, dimensions=DIMS, model_extra="matryoshka_dimensions = [4, 8]\ntruncate = true")
    )
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 3, 20, "three workers\n" + cluster.logs())
    yield gateway
    cluster.stop_all()


@pytest.fixture(scope="module")
def oai(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def oll(gw):
    client = ollama.Client(host=gw.url)
    yield client
    client.close()


@pytest.fixture
def aleph(gw):
    """Aleph Alpha clients made by a test, closed after it."""
    made = []

    def make(**kwargs) -> AlephAlphaClient:
        client = AlephAlphaClient(token="unused", **{"host": gw.url, **kwargs})
        made.append(client)
        return client

    yield make
    for client in made:
        client.session.close()


def _vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def _openai(client: openai.OpenAI, model=MODEL, **kwargs) -> np.ndarray:
    return _vectors(client.embeddings.create(model=model, input=TEXTS, **kwargs))


def _jobs_done(gw, worker: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{gw.ports[worker]}/metrics").text
    match = re.search(r'(?m)^embedq_worker_jobs_total\{outcome="ok"\} (\S+)$', text)
    return float(match.group(1)) if match else 0.0


# --- Ollama -------------------------------------------------------------------------------------


def test_ollama_embed_gives_the_openai_vectors(gw, oai, oll):
    response = oll.embed(model=MODEL, input=TEXTS)
    vectors = np.array(response.embeddings, dtype=np.float32)
    assert np.allclose(vectors, _openai(oai), atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert response.model == MODEL and response.prompt_eval_count > 0
    assert response.total_duration > 0 and response.load_duration == 0


def test_ollama_latest_tag_and_a_single_string(gw, oll):
    response = oll.embed(model=f"{MODEL}:latest", input=TEXTS[0])
    assert len(response.embeddings) == 1 and len(response.embeddings[0]) == DIMS


def test_ollama_list_shows_the_served_models(gw, oll):
    names = {m.model for m in oll.list().models}
    assert names == {f"{MODEL}:latest", f"{MRL}:latest"}


def test_ollama_legacy_embeddings(gw, oai, oll):
    response = oll.embeddings(model=MODEL, prompt=TEXTS[0])
    assert np.allclose(np.array(response.embedding, dtype=np.float32), _openai(oai)[0], atol=1e-6)


def test_ollama_truncates_by_default_and_refuses_when_told_not_to(gw, oll):
    assert oll.embed(model=MODEL, input=LONG).prompt_eval_count == MAX_LEN
    with pytest.raises(ollama.ResponseError) as info:
        oll.embed(model=MODEL, input=LONG, truncate=False)
    assert info.value.status_code == 400 and f"at most {MAX_LEN}" in info.value.error


def test_ollama_unknown_model_is_404_in_ollamas_shape(gw, oll):
    with pytest.raises(ollama.ResponseError) as info:
        oll.embed(model="no-such-model", input="x")
    assert info.value.status_code == 404 and "no-such-model" in info.value.error
    response = httpx.post(gw.url + "/api/embed", json={"model": "no-such-model", "input": "x"})
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_ollama_options_and_keep_alive_are_accepted(gw, oll):
    response = oll.embed(model=MODEL, input="x", options={"temperature": 0.1}, keep_alive="5m")
    assert len(response.embeddings[0]) == DIMS


# --- Aleph Alpha ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["/v1", ""])
def test_aleph_alpha_client_on_both_host_forms(gw, suffix, oai, aleph):
    client = aleph(host=gw.url + suffix, hosting="aleph-alpha")
    response = client.embeddings(EmbeddingV2Request(input=TEXTS), model=MODEL)
    assert np.allclose(_vectors(response), _openai(oai), atol=1e-6)
    assert response.usage.prompt_tokens > 0 and response.usage.total_tokens == response.usage.prompt_tokens


def test_aleph_alpha_tags_route_to_the_tagged_worker(gw, aleph):
    client = aleph(tags=["gpu-a"])
    plain_before, tagged_before = _jobs_done(gw, "plain"), _jobs_done(gw, "gpu-a")
    for i in range(8):
        client.embeddings(EmbeddingV2Request(input=f"tagged {i}"), model=MODEL)
    assert _jobs_done(gw, "gpu-a") - tagged_before == 8
    assert _jobs_done(gw, "plain") == plain_before


def test_aleph_alpha_unknown_tag_is_a_clear_error_not_a_hang(gw, aleph):
    client = aleph(tags=["gpu-z"], request_timeout_seconds=10)
    started = time.monotonic()
    with pytest.raises(ValueError, match="gpu-z"):
        client.embeddings(EmbeddingV2Request(input="x"), model=MODEL)
    assert time.monotonic() - started < 5


def test_aleph_alpha_dimensions_on_a_matryoshka_model(gw, aleph):
    response = aleph().embeddings(EmbeddingV2Request(input=TEXTS, dimensions=8), model=MRL)
    assert [len(d.embedding) for d in response.data] == [8, 8]


# --- dimensions and truncation across dialects ----------------------------------------------------


def test_matryoshka_dimensions_cut_and_renormalise(gw, oai, oll):
    full = _openai(oai, MRL)
    cut = _openai(oai, MRL, dimensions=8)
    assert cut.shape == (2, 8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert np.allclose(cut, expected, atol=1e-6)
    ollama_cut = np.array(oll.embed(model=MRL, input=TEXTS, dimensions=4).embeddings)
    assert ollama_cut.shape == (2, 4) and np.allclose(np.linalg.norm(ollama_cut, axis=1), 1.0, atol=1e-6)


def test_unsupported_dimensions_are_refused_by_openais_dialect_and_cut_by_ollamas(gw, oai, oll):
    with pytest.raises(openai.BadRequestError, match="4, 8, 16"):
        _openai(oai, MRL, dimensions=5)
    with pytest.raises(openai.BadRequestError, match="not a Matryoshka model"):
        _openai(oai, MODEL, dimensions=8)
    (cut,) = oll.embed(model=MODEL, input="x", dimensions=8).embeddings  # as Ollama: any smaller size, re-normalised
    assert len(cut) == 8 and np.linalg.norm(cut) == pytest.approx(1.0, abs=1e-5)


def test_truncation_per_request_and_per_model(gw, oai):
    client = oai
    with pytest.raises(openai.BadRequestError, match=f"at most {MAX_LEN}"):
        client.embeddings.create(model=MODEL, input=LONG)
    asked = client.embeddings.create(model=MODEL, input=LONG, extra_body={"truncate": True})
    assert asked.usage.prompt_tokens == MAX_LEN
    by_model = client.embeddings.create(model=MRL, input=LONG)  # MRL's config says truncate = true
    assert by_model.usage.prompt_tokens == MAX_LEN
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MRL, input=LONG, extra_body={"truncate": False})


def test_openapi_document_describes_the_public_endpoints(gw):
    document = httpx.get(gw.url + "/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    for path in ("/v1/embeddings", "/embeddings", "/v1/models", "/api/embed", "/api/embeddings", "/api/tags"):
        assert path in document["paths"], path
    assert not any(path.startswith("/internal") for path in document["paths"])
    schema = document["components"]["schemas"]["EmbeddingsRequest"]
    assert {"model", "input"} <= set(schema["required"])


# --- every call real clients make (issue: Ollama in full, OpenAI's edges, rerank) ---------------


def test_langchain_ollama_embeds_3000_documents_in_one_call(gw):
    from langchain_ollama import OllamaEmbeddings

    texts = [f"document {i} of an index" for i in range(3000)]
    embeddings = OllamaEmbeddings(model=MODEL, base_url=gw.url)
    try:
        vectors = embeddings.embed_documents(texts)
    finally:
        embeddings._client.close()  # it never closes its ollama client itself (a ResourceWarning here)
    assert len(vectors) == 3000 and np.allclose(vectors[1234], expected_one(texts[1234]), atol=1e-6)


def test_chromadb_adds_3000_documents_through_its_ollama_function(gw, tmp_path):
    import chromadb
    from chromadb.utils.embedding_functions import OllamaEmbeddingFunction

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=chromadb.Settings(anonymized_telemetry=False))
    function = OllamaEmbeddingFunction(url=gw.url, model_name=MODEL)
    collection = client.create_collection("docs", embedding_function=function)  # type: ignore[arg-type]
    try:
        collection.add(ids=[str(i) for i in range(3000)], documents=[f"passage {i} about things" for i in range(3000)])
        found = collection.query(query_texts=["passage 42 about things"], n_results=1)
    finally:
        function._client.close()  # it never closes its ollama client itself (a ResourceWarning here)
    assert collection.count() == 3000 and found["ids"] == [["42"]]


def test_ollama_show_and_ps(gw, oll):
    shown = oll.show(MODEL)
    assert shown.modelinfo["bert.embedding_length"] == DIMS and "embedding" in (shown.capabilities or [])
    assert MODEL + ":latest" in [m.model for m in oll.ps().models]


def test_openai_retrieves_a_model_and_raises_bad_request_for_a_wrong_type(oai):
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError) as info:
        oai.embeddings.create(model=MODEL, input=TEXTS, dimensions="8")  # type: ignore[arg-type]
    assert info.value.code == "invalid_type" and "dimensions" in info.value.message


def test_cohere_client_v2_reranks(gw):
    import cohere

    documents = ["The weather is mild.", TEXTS[0], "Stocks fell."]
    with cohere.ClientV2(api_key="unused", base_url=gw.url) as client:
        ranked = client.rerank(model=MODEL, query=TEXTS[0], documents=documents, top_n=2)
    assert [r.index for r in ranked.results] == [1, *[r.index for r in ranked.results][1:]] and len(ranked.results) == 2
    assert ranked.results[0].relevance_score == pytest.approx(1.0, abs=1e-5)  # the query itself


def expected_one(text: str) -> np.ndarray:
    from tests.fakes import expected

    return expected([text])[0]
