"""Client API keys and worker tokens, through real processes: nobody in where they do not belong."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest
from aleph_alpha_client import Client as AlephAlphaClient
from aleph_alpha_client import EmbeddingV2Request

from tests.system.conftest import REPO, Cluster, fake_worker_config, free_port, wait_until

WORKER_TOKEN = "worker-secret-0123456789"
MODEL, OTHER = "fake-model", "other-model"
WORKER_PATHS = [
    "/internal/v1/workers/heartbeat",
    "/internal/v1/workers/leave",
    "/internal/v1/lease",
    "/internal/v1/results",
    "/internal/v1/errors",
]


def keys(db, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "--db", str(db), *args], capture_output=True, text=True, cwd=REPO, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    db = tmp / "keys.db"
    secrets = {
        "full": keys(db, "create", "full"),
        "scoped": keys(db, "create", "scoped", "--models", MODEL),
        "doomed": keys(db, "create", "doomed"),
        "brief": keys(db, "create", "brief", "--expires", "2s"),
    }
    cluster = Cluster(tmp)
    gateway = cluster.gateway(env={"EMBEDQ_KEYS_DB": str(db), "EMBEDQ_WORKER_TOKENS": WORKER_TOKEN})
    metrics_port = free_port()
    cluster.worker(fake_worker_config(gateway.url, MODEL, token=WORKER_TOKEN, metrics_port=metrics_port))
    cluster.worker(fake_worker_config(gateway.url, OTHER, token=WORKER_TOKEN))
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 2, 20, "two workers\n" + cluster.logs())
    yield {"gw": gateway, "db": db, "keys": secrets, "cluster": cluster, "worker_metrics": metrics_port, "tmp": tmp}
    cluster.stop_all()


def _post(env, path="/v1/embeddings", key=None, model=MODEL):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(env["gw"].url + path, json={"model": model, "input": "x"}, headers=headers, timeout=10)


def test_a_valid_key_is_served(env):
    assert _post(env, key=env["keys"]["full"]).status_code == 200
    assert _post(env, "/api/embed", key=env["keys"]["full"]).status_code == 200


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings", "/api/embed", "/api/embeddings"])
@pytest.mark.parametrize("key", [None, "eq-not-a-real-key", WORKER_TOKEN], ids=["no-key", "wrong-key", "worker-token"])
def test_no_wrong_or_worker_credential_is_401_in_the_dialects_shape(env, path, key):
    response = _post(env, path, key=key)
    assert response.status_code == 401
    error = response.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert "API key" in message
    if key:
        assert key not in response.text


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/api/tags"])
def test_listing_needs_a_key(env, path):
    assert httpx.get(env["gw"].url + path).status_code == 401


def test_a_scoped_key_is_403_elsewhere_and_sees_only_its_models(env):
    scoped = {"Authorization": f"Bearer {env['keys']['scoped']}"}
    assert _post(env, key=env["keys"]["scoped"]).status_code == 200
    for path in ("/v1/embeddings", "/api/embed"):
        response = _post(env, path, key=env["keys"]["scoped"], model=OTHER)
        assert response.status_code == 403 and "scoped" in response.text and OTHER in response.text
    # Even a model that does not exist is a 403: a key learns nothing outside its scope.
    assert _post(env, key=env["keys"]["scoped"], model="no-such-model").status_code == 403
    assert [m["id"] for m in httpx.get(env["gw"].url + "/v1/models", headers=scoped).json()["data"]] == [MODEL]
    assert [m["name"] for m in httpx.get(env["gw"].url + "/api/tags", headers=scoped).json()["models"]] == [f"{MODEL}:latest"]
    full = {"Authorization": f"Bearer {env['keys']['full']}"}
    assert {m["id"] for m in httpx.get(env["gw"].url + "/v1/models", headers=full).json()["data"]} == {MODEL, OTHER}


def test_a_revoked_key_stops_working_at_once(env):
    assert _post(env, key=env["keys"]["doomed"]).status_code == 200
    keys(env["db"], "revoke", "doomed")
    assert _post(env, key=env["keys"]["doomed"]).status_code == 401


def test_an_expired_key_stops_working(env):
    created = time.time()
    if _post(env, key=env["keys"]["brief"]).status_code == 200:
        assert time.time() - created < 2.5
    wait_until(lambda: _post(env, key=env["keys"]["brief"]).status_code == 401, 5, "the key to expire")


@pytest.mark.parametrize("path", WORKER_PATHS)
def test_a_client_key_cannot_act_as_a_worker(env, path):
    headers = {"Authorization": f"Bearer {env['keys']['full']}", "Content-Type": "application/json"}
    response = httpx.post(env["gw"].url + path, content=b"{}", headers=headers)
    assert response.status_code == 401


def test_real_clients_carry_their_key(env):
    url, key = env["gw"].url, env["keys"]["full"]
    with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:
        assert len(client.embeddings.create(model=MODEL, input="x").data) == 1
    with (
        openai.OpenAI(base_url=url + "/v1", api_key="eq-wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.embeddings.create(model=MODEL, input="x")
    with (
        openai.OpenAI(base_url=url + "/v1", api_key=env["keys"]["scoped"], max_retries=0) as client,
        pytest.raises(openai.PermissionDeniedError),
    ):
        client.embeddings.create(model=OTHER, input="x")
    ollama_client = ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"})
    assert len(ollama_client.embed(model=MODEL, input="x").embeddings) == 1
    ollama_client.close()
    aleph = AlephAlphaClient(token=key, host=url)
    assert len(aleph.embeddings(EmbeddingV2Request(input="x"), model=MODEL).data) == 1
    aleph.session.close()


def test_usage_is_counted_per_key_name_and_last_use_recorded(env):
    for _ in range(3):
        assert _post(env, key=env["keys"]["full"]).status_code == 200
    metrics = httpx.get(env["gw"].url + "/metrics").text
    requests = float(re.search(r'(?m)^embedq_gateway_key_requests_total\{key="full"\} (\S+)$', metrics).group(1))
    tokens = float(re.search(r'(?m)^embedq_gateway_key_tokens_total\{key="full"\} (\S+)$', metrics).group(1))
    assert requests >= 3 and tokens >= 3 * 3
    time.sleep(1.5)  # last-used times are written off the request path, every second
    listing = keys(env["db"], "list")
    full_row = next(line for line in listing.splitlines() if line.startswith("full "))
    assert not full_row.rstrip().endswith("-"), listing  # a last-used time is shown (written within a second)


def test_a_mounted_keys_file_works_and_is_reread_when_it_changes(env):
    path = env["tmp"] / "keys.json"
    path.write_text(keys(env["db"], "export"))
    cluster = Cluster(env["tmp"] / "file")
    (env["tmp"] / "file").mkdir()
    gateway = cluster.gateway(env={"EMBEDQ_KEYS_FILE": str(path), "EMBEDQ_WORKER_TOKENS": WORKER_TOKEN})
    try:
        cluster.worker(fake_worker_config(gateway.url, MODEL, token=WORKER_TOKEN))
        gateway_env = {"gw": gateway}
        wait_until(lambda: _post(gateway_env, key=env["keys"]["full"]).status_code == 200, 20, "the file-keyed gateway")
        keys(env["db"], "create", "late")
        keys(env["db"], "revoke", "full")
        replacement = env["tmp"] / "keys.json.new"
        replacement.write_text(keys(env["db"], "export"))
        replacement.replace(path)  # as kubelet updates a Secret: a new file swapped in
        assert _post(gateway_env, key=env["keys"]["full"]).status_code == 401
        assert _post(gateway_env, key=env["keys"]["scoped"]).status_code == 200
    finally:
        cluster.stop_all()


def test_no_secret_appears_in_logs_or_metrics(env):
    for _ in range(2):
        _post(env, key=env["keys"]["scoped"])
        _post(env, key="eq-a-guessed-key-that-is-wrong")
        httpx.post(env["gw"].url + "/internal/v1/lease", json={}, headers={"Authorization": "Bearer worker-guess-42"})
    gw_metrics = httpx.get(env["gw"].url + "/metrics").text
    worker_metrics = httpx.get(f"http://127.0.0.1:{env['worker_metrics']}/metrics").text
    exposed = env["cluster"].logs() + gw_metrics + worker_metrics
    for secret in [*env["keys"].values(), WORKER_TOKEN, "eq-a-guessed-key-that-is-wrong", "worker-guess-42"]:
        assert secret not in exposed
        assert secret[:12] not in exposed  # not even a prefix


def test_a_public_gateway_without_keys_refuses_to_start():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        env={"EMBEDQ_WORKER_TOKENS": WORKER_TOKEN, "PATH": ""},
    )
    assert result.returncode == 2 and "EMBEDQ_KEYS_DB" in result.stderr
