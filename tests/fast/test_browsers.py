"""What a web page can make a browser send, and other edges of HTTP a client can reach: hosts,
origins, content types, duplicate credentials, redirects, scope in error messages, /metrics."""

from __future__ import annotations

import pytest

from gateway.redis_link import safe_url
from gateway.tenancy.keys import SqliteKeyStore
from tests.fast.conftest import running

pytestmark = pytest.mark.anyio
PAGE = "https://attacker.example"
BODY = b'{"model": "fake-model", "input": "the developer\'s text"}'


@pytest.mark.parametrize("path", ["/v1/embeddings", "/api/embed", "/internal/v1/workers/heartbeat", "/internal/v1/lease"])
async def test_a_cross_site_simple_request_is_refused(path):
    """What a page's fetch(..., {mode: "no-cors", body}) sends: text/plain, a foreign Origin."""
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post(path, content=BODY, headers={"Origin": PAGE, "Content-Type": "text/plain"})
    assert response.status_code == 403, response.text
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "192.168.1.7", "localhost.evil.example"])
async def test_a_foreign_host_is_refused_in_dev_mode(host):
    """DNS rebinding: a page's own name resolving to 127.0.0.1 reaches the gateway with its Host."""
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/v1/embeddings", content=BODY,
                                              headers={"Host": host, "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 421 and response.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "127.0.0.2", "localhost"])
async def test_loopback_hosts_are_answered(host):
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/v1/embeddings", content=BODY,
                                              headers={"Host": host, "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 200, response.text


async def test_listed_hosts_and_origins_are_answered_with_cors():
    env = {"EMBEDQ_ALLOWED_HOSTS": "embeddings.internal", "EMBEDQ_ALLOWED_ORIGINS": "https://notebook.internal"}
    async with running(env) as gateway:
        await gateway.worker()
        host = {"Host": "embeddings.internal"}
        preflight = await gateway.client.options("/v1/embeddings", headers={
            **host, "Origin": "https://notebook.internal", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
        answered = await gateway.client.post("/v1/embeddings", content=BODY, headers={
            **host, "Origin": "https://notebook.internal", "Content-Type": "application/json"})  # fmt: skip
        other = await gateway.client.post("/v1/embeddings", content=BODY,
                                          headers={**host, "Origin": PAGE, "Content-Type": "application/json"})  # fmt: skip
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://notebook.internal"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == "https://notebook.internal"
    assert other.status_code == 403


async def test_the_gateways_own_pages_are_same_origin():
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/v1/embeddings", content=BODY, headers={
            "Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080", "Content-Type": "application/json"})  # fmt: skip
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
async def test_openai_and_worker_json_routes_take_only_json(content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    async with running() as gateway:
        await gateway.worker()
        client = await gateway.client.post("/v1/embeddings", content=BODY, headers=headers)
        worker = await gateway.client.post("/internal/v1/lease", content=b"{}", headers=headers)
    for response in (client, worker):
        assert response.status_code == 415 and "application/json" in response.json()["error"]["message"], response.text


async def test_ollamas_own_curl_examples_are_answered():
    """curl -d sends application/x-www-form-urlencoded: Ollama's documented examples do, and work."""
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/api/embed", content=BODY,
                                              headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        plain = await gateway.client.post("/api/embed", content=BODY, headers={"Content-Type": "text/plain"})
    assert response.status_code == 200 and plain.status_code == 415


async def test_two_authorization_headers_are_refused_not_one_picked():
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.post("/v1/embeddings", content=BODY, headers=[
            ("Content-Type", "application/json"), ("Authorization", "Bearer one"), ("Authorization", "Bearer two")])  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["code"] == "duplicate_authorization"


async def test_a_trailing_slash_is_redirected_relatively():
    async with running() as gateway:
        await gateway.worker()
        response = await gateway.client.get("/v1/models/?x=1", headers={"Host": "localhost:8080"})
    assert response.status_code == 307 and response.headers["location"] == "/v1/models?x=1"


async def test_an_unknown_model_lists_only_the_models_of_the_keys_scope(tmp_path):
    store = SqliteKeyStore(tmp_path / "keys.db")
    secret, _ = store.create("scoped", ["ghost", "m1"], None)
    store.close()
    async with running({"EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}) as gateway:
        await gateway.worker("m1")
        await gateway.worker("m2")
        response = await gateway.client.post("/v1/embeddings", json={"model": "ghost", "input": "x"},
                                             headers={"Authorization": f"Bearer {secret}"})  # fmt: skip
    message = response.json()["error"]["message"]
    assert response.status_code == 404 and "m1" in message and "m2" not in message


async def test_metrics_can_require_their_own_token(tmp_path):
    store = SqliteKeyStore(tmp_path / "keys.db")
    client_key, _ = store.create("team", None, None)
    store.close()
    env = {"EMBEDQ_METRICS_TOKEN": "scrape-0123456789", "EMBEDQ_KEYS_DB": str(tmp_path / "keys.db")}
    async with running(env) as gateway:
        open_ = await gateway.client.get("/metrics")
        with_key = await gateway.client.get("/metrics", headers={"Authorization": f"Bearer {client_key}"})
        with_token = await gateway.client.get("/metrics", headers={"Authorization": "Bearer scrape-0123456789"})
    assert open_.status_code == 401 and with_key.status_code == 401
    assert with_token.status_code == 200 and "embedq_gateway_requests_total" in with_token.text
    assert client_key not in with_token.text and "scrape-0123456789" not in with_token.text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://user:s3cret@redis:6379/0", "redis://user:***@redis:6379/0"),
        ("redis://redis:6379/0?password=s3cret&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("rediss://redis/0?Password=s3cret", "rediss://redis/0?Password=***"),
        ("redis://:p@ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_every_form_of_redis_password_is_masked_in_logs(url, masked):
    assert safe_url(url) == masked


@pytest.mark.parametrize(
    "headers", [{"Host": "["}, {"Host": "[::1"}, {"Host": "127.0.0.1:99999"}, {"Origin": "http://["}, {"Origin": "http://[::1"}]
)
async def test_a_host_or_origin_that_does_not_parse_is_refused_not_a_500(headers, caplog):
    """Any stranger can send these: each was a 500 and a logged traceback."""
    async with running() as gateway:
        for path in ("/health", "/v1/embeddings", "/ui/login"):
            response = await gateway.client.get(path, headers=headers)
            assert response.status_code in (403, 421), (path, response.status_code, response.text)
    assert not [r for r in caplog.records if r.exc_info], caplog.text


async def test_the_consoles_odd_paths_and_forms_get_4xx_not_500():
    async with running({"EMBEDQ_ADMIN_TOKENS": "admin-token-for-browser-tests"}) as gateway:
        nul = await gateway.client.get("/ui/static/app.js%00.py")
        fields = await gateway.client.post("/ui/login", data={f"field{i}": "x" for i in range(6)})
    assert nul.status_code == 404 and "no console file" in nul.json()["error"]["message"]
    assert fields.status_code == 400 and "one field, &#x27;token&#x27;" in fields.text
