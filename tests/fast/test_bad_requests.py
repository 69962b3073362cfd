"""Malformed requests, one table: the right status, the dialect's error shape, the field named,
and a gateway and workers that keep serving afterwards. (The edges only a real server has, slow
clients and bloated heads, are in tests/system/test_http_edges.py.)"""

from __future__ import annotations

import orjson
import pytest

from gateway.dialects.schemas import ErrorResponse
from tests.fast.conftest import HandWorker, running

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
BODY_LIMIT = 65536
J = "application/json"


def body(**fields) -> bytes:
    return orjson.dumps(fields)


# (case id, method, path, raw body, content type, status, words the message must contain)
CASES = [
    ("not-json", "POST", "/v1/embeddings", b'{"model": "fake-model", "input": ', J, 400, ["JSON"]),
    ("empty-body", "POST", "/v1/embeddings", b"", J, 400, ["JSON"]),
    ("json-array", "POST", "/v1/embeddings", b'["fake-model", "x"]', J, 400, ["JSON object"]),
    ("json-string", "POST", "/v1/embeddings", b'"hello"', J, 400, ["JSON object"]),
    ("json-null", "POST", "/v1/embeddings", b"null", J, 400, ["JSON object"]),
    ("deep-nesting", "POST", "/v1/embeddings", b"[" * 5000 + b"]" * 5000, J, 400, ["JSON"]),
    ("invalid-utf8", "POST", "/v1/embeddings", b'{"model": "fake-model", "input": "\xff\xfe"}', J, 400, ["JSON"]),
    ("lone-surrogate", "POST", "/v1/embeddings", b'{"model": "fake-model", "input": "\\ud800"}', J, 400, ["JSON"]),
    (
        "integer-over-64-bits",
        "POST",
        "/v1/embeddings",
        b'{"model": "fake-model", "input": [1' + b"0" * 30 + b"]}",
        J,
        400,
        ["'input[0]'"],
    ),  # JSON parsers read it as a float
    (
        "form-encoded",
        "POST",
        "/v1/embeddings",
        b"model=fake-model&input=hello",
        "application/x-www-form-urlencoded",
        415,
        ["Content-Type", "application/json"],
    ),
    ("text-plain", "POST", "/v1/embeddings", body(model=MODEL, input="x"), "text/plain", 415, ["application/json"]),
    ("no-content-type", "POST", "/v1/embeddings", body(model=MODEL, input="x"), None, 415, ["application/json"]),
    ("ollama-text-plain", "POST", "/api/embed", body(model=MODEL, input="x"), "text/plain", 415, ["application/json"]),
    (
        "cross-site-origin",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input="x"),
        J,
        403,
        ["cross-origin", "EMBEDQ_ALLOWED_ORIGINS"],
        {"Origin": "https://elsewhere.example"},
    ),  # fmt: skip
    (
        "foreign-host",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input="x"),
        J,
        421,
        ["evil.example", "EMBEDQ_ALLOWED_HOSTS"],
        {"Host": "evil.example"},
    ),  # fmt: skip
    (
        "two-authorizations",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input="x"),
        J,
        400,
        ["one Authorization"],
        [("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
    ),  # fmt: skip
    (
        "token-ids-beyond-the-context",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input=[[1] * 65]),
        J,
        400,
        ["'input'", "at most 64"],
    ),  # fmt: skip
    ("missing-input", "POST", "/v1/embeddings", body(model=MODEL), J, 400, ["'input'", "required"]),
    ("missing-model", "POST", "/v1/embeddings", body(input="x"), J, 400, ["'model'", "required"]),
    ("empty-model", "POST", "/v1/embeddings", body(model="", input="x"), J, 400, ["'model'"]),
    ("model-number", "POST", "/v1/embeddings", body(model=5, input="x"), J, 400, ["'model'"]),
    ("input-number", "POST", "/v1/embeddings", body(model=MODEL, input=5), J, 400, ["'input'"]),
    ("input-object", "POST", "/v1/embeddings", body(model=MODEL, input={"text": "x"}), J, 400, ["'input'"]),
    ("input-null", "POST", "/v1/embeddings", body(model=MODEL, input=None), J, 400, ["'input'"]),
    ("input-empty-string", "POST", "/v1/embeddings", body(model=MODEL, input=""), J, 400, ["'input'", "empty"]),
    ("input-empty-list", "POST", "/v1/embeddings", body(model=MODEL, input=[]), J, 400, ["'input'", "empty"]),
    ("input-empty-item", "POST", "/v1/embeddings", body(model=MODEL, input=["a", ""]), J, 400, ["'input[1]'"]),
    ("input-mixed", "POST", "/v1/embeddings", body(model=MODEL, input=["a", 3]), J, 400, ["'input[1]'"]),
    ("input-ids-then-text", "POST", "/v1/embeddings", body(model=MODEL, input=[101, "a"]), J, 400, ["'input[1]'"]),
    ("input-nested-garbage", "POST", "/v1/embeddings", body(model=MODEL, input=[[["a"]]]), J, 400, ["'input[0]'"]),
    ("input-float-token", "POST", "/v1/embeddings", body(model=MODEL, input=[1.5]), J, 400, ["'input[0]'"]),
    ("input-bool-tokens", "POST", "/v1/embeddings", body(model=MODEL, input=[True]), J, 400, ["'input[0]'"]),
    ("too-many-inputs", "POST", "/v1/embeddings", body(model=MODEL, input=["x"] * 2049), J, 400, ["'input'", "2048"]),
    ("negative-token", "POST", "/v1/embeddings", body(model=MODEL, input=[[101, -5]]), J, 400, ["'input[0][1]'"]),
    ("huge-token", "POST", "/v1/embeddings", body(model=MODEL, input=[2**40]), J, 400, ["token id"]),
    (
        "token-outside-vocab",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input=[[101, 99999, 102]]),
        J,
        400,
        ["'input[0]'", "vocabulary"],
    ),
    (
        "over-long",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input=["fine", "word " * 100]),
        J,
        400,
        ["'input[1]'", "at most 64"],
    ),
    (
        "encoding-hex",
        "POST",
        "/v1/embeddings",
        body(model=MODEL, input="x", encoding_format="hex"),
        J,
        400,
        ["'encoding_format'"],
    ),
    ("encoding-number", "POST", "/v1/embeddings", body(model=MODEL, input="x", encoding_format=5), J, 400, ["'encoding_format'"]),
    ("dimensions-string", "POST", "/v1/embeddings", body(model=MODEL, input="x", dimensions="8"), J, 400, ["'dimensions'"]),
    ("dimensions-zero", "POST", "/v1/embeddings", body(model=MODEL, input="x", dimensions=0), J, 400, ["'dimensions'"]),
    ("dimensions-negative", "POST", "/v1/embeddings", body(model=MODEL, input="x", dimensions=-1), J, 400, ["'dimensions'"]),
    ("dimensions-huge", "POST", "/v1/embeddings", body(model=MODEL, input="x", dimensions=10**12), J, 400, ["'dimensions'"]),
    ("dimensions-float", "POST", "/v1/embeddings", body(model=MODEL, input="x", dimensions=1.5), J, 400, ["'dimensions'"]),
    ("user-number", "POST", "/v1/embeddings", body(model=MODEL, input="x", user=5), J, 400, ["'user'"]),
    ("truncate-string", "POST", "/v1/embeddings", body(model=MODEL, input="x", truncate="yes"), J, 400, ["'truncate'"]),
    ("tags-string", "POST", "/embeddings", body(model=MODEL, input="x", tags="gpu"), J, 400, ["'tags'"]),
    ("tags-unknown", "POST", "/embeddings", body(model=MODEL, input="x", tags=["gpu-z"]), J, 400, ["gpu-z"]),
    ("unknown-model", "POST", "/v1/embeddings", body(model="no-such-model", input="x"), J, 404, ["no-such-model", MODEL]),
    ("model-without-workers", "POST", "/v1/embeddings", body(model="gone", input="x"), J, 503, ["gone"]),
    ("body-too-large", "POST", "/v1/embeddings", body(model=MODEL, input="x" * (BODY_LIMIT + 1)), J, 413, [str(BODY_LIMIT)]),
    ("wrong-method", "GET", "/v1/embeddings", None, J, 405, ["GET"]),
    ("unknown-path", "POST", "/v1/embedding", body(model=MODEL, input="x"), J, 404, ["/v1/embedding"]),
    ("ollama-not-json", "POST", "/api/embed", b"{", J, 400, ["JSON"]),
    ("ollama-missing-model", "POST", "/api/embed", body(input="x"), J, 400, ["'model'"]),
    ("ollama-input-number", "POST", "/api/embed", body(model=MODEL, input=5), J, 400, ["'input'"]),
    ("ollama-input-item-number", "POST", "/api/embed", body(model=MODEL, input=["a", 5]), J, 400, ["'input[1]'"]),
    (
        "ollama-truncate-false",
        "POST",
        "/api/embed",
        body(model=MODEL, input="word " * 100, truncate=False),
        J,
        400,
        ["at most 64"],
    ),
    ("ollama-unknown-model", "POST", "/api/embed", body(model="no-such-model", input="x"), J, 404, ["no-such-model"]),
    ("ollama-dimensions-string", "POST", "/api/embed", body(model=MODEL, input="x", dimensions="8"), J, 400, ["'dimensions'"]),
    ("ollama-options-list", "POST", "/api/embed", body(model=MODEL, input="x", options=[1]), J, 400, ["'options'"]),
    ("ollama-too-large", "POST", "/api/embed", body(model=MODEL, input="x" * (BODY_LIMIT + 1)), J, 413, [str(BODY_LIMIT)]),
    ("ollama-legacy-no-model", "POST", "/api/embeddings", body(prompt="x"), J, 400, ["model is required"]),
    ("ollama-legacy-prompt-number", "POST", "/api/embeddings", body(model=MODEL, prompt=5), J, 400, ["'prompt'"]),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module-wide: one gateway for the whole table


@pytest.fixture(scope="module")
async def gw():
    env = {"EMBEDQ_MAX_BODY_BYTES": str(BODY_LIMIT), "EMBEDQ_WORKER_WAIT_S": "0"}
    async with running(env) as gateway:
        await gateway.worker(MODEL)
        gone = HandWorker(gateway, "gone-worker", checkpoint="gone", model="gone")
        await gone.register()
        await gone.call("/workers/leave", json={"worker_id": "gone-worker"})  # a model served once, not now
        yield gateway


def test_the_table_has_enough_distinct_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize(
    ("method", "path", "raw", "content_type", "status", "words", "headers"),
    [(*case[1:], *(() if len(case) == 8 else ({},))) for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_bad_request(gw, method, path, raw, content_type, status, words, headers):
    extra = headers if isinstance(headers, list) else list(headers.items())
    headers = [*([("Content-Type", content_type)] if content_type else []), *extra]
    response = await gw.client.request(method, path, content=raw, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    if path.startswith("/api/"):
        payload = response.json()
        assert set(payload) == {"error"} and isinstance(payload["error"], str)
        message = payload["error"]
    else:
        message = ErrorResponse.model_validate(response.json()).error.message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


async def test_everything_still_serves_after_the_bad_requests(gw):
    for path, payload in (
        ("/v1/embeddings", {"model": MODEL, "input": ["still", "here"]}),
        ("/api/embed", {"model": MODEL, "input": ["still", "here"]}),
    ):
        response = await gw.client.post(path, json=payload)
        assert response.status_code == 200, response.text
