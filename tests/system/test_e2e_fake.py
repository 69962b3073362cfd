"""End to end through real processes on loopback: a gateway and two fake-engine workers."""

from __future__ import annotations

import base64
import math
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.fakes import metric
from tests.system.conftest import REPO, Cluster, fake_worker_config, free_port, wait_until

MODEL = "fake-model"
DIMS = 16


@pytest.fixture(params=["memory", "redis"])
def queue_backend(request) -> str:
    """Every test of this module runs on both queue backends."""
    return request.param


@pytest.fixture(scope="module", params=["memory", "redis"])
def running(tmp_path_factory, request):
    """One gateway with two workers on MODEL, shared by the tests of this module, on each backend."""
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), redis)
    gateway = cluster.gateway()
    ports = [free_port(), free_port()]
    for port in ports:
        cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.02, metrics_port=port))
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 2, 20, "two workers\n" + cluster.logs())
    yield gateway, ports, cluster
    cluster.stop_all()


def _embed(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)


def _vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def test_two_inputs_give_two_unit_vectors(running):
    gateway, _, _ = running
    response = _embed(gateway.url, input=["Why is the sky blue?", "Why is the grass green?"])
    body = response.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    vectors = _vectors(response)
    assert vectors.shape == (2, DIMS)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]


def test_embeddings_without_v1_prefix(running):
    gateway, _, _ = running
    response = httpx.post(gateway.url + "/embeddings", json={"model": MODEL, "input": "hello"})
    assert _vectors(response).shape == (1, DIMS)


def test_base64_is_little_endian_float32_of_the_same_vector(running):
    gateway, _, _ = running
    as_float = _vectors(_embed(gateway.url, input="same text"))[0]
    b64 = _embed(gateway.url, input="same text", encoding_format="base64").json()["data"][0]["embedding"]
    assert np.array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"), as_float)


def test_openai_client_same_vectors_with_and_without_float(running):
    gateway, _, _ = running
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    texts = ["Why is the sky blue?", "Why is the grass green?"]
    default = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    # The same float32 numbers: base64 decodes to their exact float64 widening, JSON to their
    # shortest decimal form; both narrow back to identical float32 values.
    as_f32 = lambda response: np.array([d.embedding for d in response.data], dtype=np.float32)  # noqa: E731
    assert np.array_equal(as_f32(default), as_f32(floats))
    assert len(default.data[0].embedding) == DIMS and default.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_large_request_is_split_and_reassembled_in_order(running):
    gateway, _, _ = running
    texts = [f"sentence number {i}" for i in range(100)]
    together = _vectors(_embed(gateway.url, input=texts))
    alone = np.concatenate([_vectors(_embed(gateway.url, input=t)) for t in texts[::17]])
    assert np.array_equal(together[::17], alone)


def test_two_workers_share_the_load(running):
    gateway, ports, _ = running
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: _embed(gateway.url, input=[f"load {i}"] * 3).status_code, range(64)))
    assert statuses == [200] * 64
    for port in ports:
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        ok = float(re.search(r'embedq_worker_jobs_total\{outcome="ok"\} (\S+)', metrics).group(1))
        assert ok > 0, f"worker on metrics port {port} took no job"


def test_unknown_model_is_404_in_openai_shape(running):
    gateway, _, _ = running
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "no-such-model" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b'{"model": "fake-model", "input": ', 400, "JSON"),
        (b'{"model": "fake-model"}', 400, "'input'"),
        (b'{"input": "x"}', 400, "'model'"),
        (b'["not", "an", "object"]', 400, "JSON object"),
        (b'{"model": "fake-model", "input": "x", "encoding_format": "hex"}', 400, "'encoding_format'"),
        (b'{"model": "fake-model", "input": 5}', 400, "'input'"),  # as OpenAI: a wrong type is a 400 too
        (b'{"model": 5, "input": "x"}', 400, "'model'"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(running, body, status, names):
    gateway, _, _ = running
    response = httpx.post(gateway.url + "/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert names in response.json()["error"]["message"]


def test_over_long_input_is_400_with_the_models_limit(running):
    gateway, _, _ = running
    response = _embed(gateway.url, input=["short", "word " * 100])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input[1]" and error["code"] == "context_length_exceeded"
    assert "at most 64" in error["message"]


def test_dimensions_other_than_the_models_own_are_refused(running):
    gateway, _, _ = running
    assert _vectors(_embed(gateway.url, input="x", dimensions=DIMS)).shape == (1, DIMS)
    response = _embed(gateway.url, input="x", dimensions=8)
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_metrics_are_exposed(running):
    gateway, ports, _ = running
    _embed(gateway.url, input="count me")
    text = httpx.get(gateway.url + "/metrics").text
    for name in (
        "embedq_gateway_requests_total",
        "embedq_gateway_request_seconds_bucket",
        "embedq_gateway_queue_depth",
        "embedq_gateway_workers",
        "embedq_gateway_tokens_total",
        "embedq_gateway_jobs_total",
    ):
        assert name in text, name
    assert f'embedq_gateway_workers{{model="{MODEL}"}} 2.0' in text
    worker_text = httpx.get(f"http://127.0.0.1:{ports[0]}/metrics").text
    assert "embedq_worker_ready 1.0" in worker_text and "embedq_worker_engine_seconds_bucket" in worker_text


def test_a_model_whose_workers_are_gone_is_unlisted_and_answers_503(running):
    gateway, _, cluster = running
    worker = cluster.worker(fake_worker_config(gateway.url, "short-lived", dimensions=4))
    gateway.wait_for_model("short-lived")
    worker.stop(signal.SIGKILL)  # no goodbye: the gateway must notice the silence
    wait_until(lambda: "short-lived" not in gateway.models(), 10, "the dead worker's model to be unlisted")
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": "short-lived", "input": "x"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_live_worker"
    assert MODEL in gateway.models()


def test_an_idle_worker_configured_to_heartbeat_slower_than_the_gateways_ttl_stays_listed(running):
    """Waiting idle in a long-poll touches nothing at the gateway: the heartbeats alone keep the
    worker alive, so the worker must send them within the gateway's TTL (2 s here), not every 5 s."""
    gateway, _, cluster = running
    config = fake_worker_config(gateway.url, "idle", dimensions=4)
    config = config.replace("heartbeat_interval_s = 0.5", "heartbeat_interval_s = 5").replace(
        "lease_wait_s = 2.0", "lease_wait_s = 20"
    )
    worker = cluster.worker(config)
    gateway.wait_for_model("idle")
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        assert "idle" in gateway.models(), worker.log()
        time.sleep(0.1)
    assert _embed(gateway.url, model="idle", input="still here").status_code == 200
    assert "heartbeating every 0.667s, not the configured 5s" in worker.log()
    worker.stop()


def test_sigterm_makes_a_worker_leave_at_once(running):
    gateway, _, cluster = running
    worker = cluster.worker(fake_worker_config(gateway.url, "polite", dimensions=4))
    gateway.wait_for_model("polite")
    assert worker.stop(signal.SIGTERM) == 0
    assert "polite" not in gateway.models()  # left, not timed out


def test_worker_tokens_keep_strangers_out(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_WORKER_TOKENS": "right-token,other-token"})
    stranger = cluster.worker(fake_worker_config(gateway.url, "guarded", token="wrong-token"))
    cluster.worker(fake_worker_config(gateway.url, "guarded", token="other-token"))
    gateway.wait_for_model("guarded")
    response = httpx.post(gateway.url + "/internal/v1/lease", json={"worker_id": "x", "max_items": 1, "wait_s": 0})
    assert response.status_code == 401
    assert httpx.get(gateway.url + "/health").json()["workers"] == 1
    wait_until(lambda: "HTTP 401" in stranger.log(), 10, "the stranger to log its refusal")
    assert "missing or wrong worker token" in cluster.procs[0].log()
    assert "wrong-token" not in cluster.procs[0].log()


def test_gateway_on_a_public_address_without_worker_tokens_refuses_to_start():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert result.returncode == 2 and "EMBEDQ_WORKER_TOKENS" in result.stderr


def test_unknown_path_is_404_json(running):
    gateway, _, _ = running
    response = httpx.get(gateway.url + "/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.get(gateway.url + "/v2/nothing")  # Cohere's paths answer in Cohere's shape
    assert response.status_code == 404 and "/v2/nothing" in response.json()["message"]
    response = httpx.get(gateway.url + "/v1/embeddings")
    assert response.status_code == 405 and "error" in response.json()


def test_vectors_are_unit_length_for_every_shape(running):
    gateway, _, _ = running
    vectors = _vectors(_embed(gateway.url, input=[[101, 2000, 102], [101, 102]]))
    assert vectors.shape == (2, DIMS)
    assert all(math.isclose(float(np.linalg.norm(v)), 1.0, rel_tol=1e-5) for v in vectors)


def test_a_client_that_leaves_has_its_queued_job_withdrawn(cluster: Cluster):
    gateway = cluster.gateway()
    port = free_port()
    # One input per lease and a second per batch: the second request waits in the queue.
    cluster.worker(fake_worker_config(gateway.url, "slow", delay_s=1.0, max_num_seqs=1, metrics_port=port))
    gateway.wait_for_model("slow")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, gateway.url + "/v1/embeddings", json={"model": "slow", "input": "first"}, timeout=10)
        # The worker's own count (the gateway's, on Redis, is refreshed each second: the second
        # request could then arrive at the end of the first call, and be computed before it leaves).
        leased = 'embedq_worker_leases_total{result="jobs"} 1.0'
        wait_until(lambda: leased in httpx.get(f"http://127.0.0.1:{port}/metrics").text, 5, "the first job to be leased")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.url + "/v1/embeddings", json={"model": "slow", "input": "abandoned"}, timeout=0.3)
        assert first.result().status_code == 200
    time.sleep(1.5)  # time enough for the worker to have taken the abandoned job, had it stayed
    worker_metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert metric(worker_metrics, 'embedq_worker_jobs_total{outcome="ok"}') == 1, "the abandoned job was computed"
    gateway_metrics = httpx.get(gateway.url + "/metrics").text
    assert metric(gateway_metrics, 'embedq_gateway_requests_total{endpoint="/v1/embeddings",status="499"}') == 1
    assert metric(gateway_metrics, 'embedq_gateway_queue_depth{queue="slow"}') == 0


def test_a_request_past_its_deadline_gets_504_in_each_dialect(cluster: Cluster):
    # Detection of dead and stuck workers must fit in half of the request's time (the settings refuse less).
    gateway = cluster.gateway(env={"EMBEDQ_REQUEST_TIMEOUT_S": "1", "EMBEDQ_WORKER_TTL_S": "0.5", "EMBEDQ_LEASE_TTL_S": "0.5"})
    cluster.worker(fake_worker_config(gateway.url, "sluggish", delay_s=2.0, max_num_seqs=1))
    gateway.wait_for_model("sluggish")
    openai_style = httpx.post(gateway.url + "/v1/embeddings", json={"model": "sluggish", "input": "x"}, timeout=10)
    assert openai_style.status_code == 504
    assert openai_style.json()["error"]["code"] == "timeout" and "1s" in openai_style.json()["error"]["message"]
    ollama_style = httpx.post(gateway.url + "/api/embed", json={"model": "sluggish", "input": "x"}, timeout=10)
    assert ollama_style.status_code == 504 and "1s" in ollama_style.json()["error"]
