"""The OpenAPI 3.1 document of the public endpoints, built from the wire models in dialects/schemas.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.dialects import schemas as p

ERRORS = {
    400: "invalid request: a missing field, a wrong type or value",
    401: "no valid API key",
    403: "a model outside the key's scope, or a cross-site origin",
    404: "unknown model or path",
    413: "body too large",
    415: "not JSON",
    429: "overloaded",
    500: "the engine failed",
    503: "no live worker",
    504: "timed out",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(model)}}}


def _operation(
    summary: str, response: type[BaseModel], error: type[BaseModel], request: type[BaseModel] | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", **_json(response)},
            **{str(code): {"description": what, **_json(error)} for code, what in ERRORS.items()},
        },
    }
    if request is not None:
        operation["requestBody"] = {"required": True, **_json(request)}
    return operation


def openapi_document(version: str) -> dict[str, Any]:
    requests: list[type[BaseModel]] = [
        p.EmbeddingsRequest, p.OllamaEmbedRequest, p.OllamaEmbeddingsRequest, p.RerankRequest, p.ScoreRequest,
        p.TokenizeRequest, p.DetokenizeRequest, p.CohereEmbedRequest, p.SparseRequest,
    ]  # fmt: skip
    responses: list[type[BaseModel]] = [
        p.EmbeddingsResponse, p.ModelList, p.ModelObject, p.ErrorResponse, p.OllamaEmbedResponse, p.OllamaEmbeddingsResponse,
        p.OllamaTags, p.OllamaError, p.RerankResponse, p.CohereRerankResponse, p.ScoreResponse, p.TokenizeResponse,
        p.DetokenizeResponse, p.CohereEmbedResponse, p.SparseResponse,
    ]  # fmt: skip
    modes: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in requests),
        *((m, "serialization") for m in responses),
    ]
    _, schemas = models_json_schema(modes, ref_template="#/components/schemas/{model}")
    embeddings = _operation("Create embeddings (OpenAI)", p.EmbeddingsResponse, p.ErrorResponse, p.EmbeddingsRequest)
    models = _operation("Models with a live worker (OpenAI)", p.ModelList, p.ErrorResponse)
    model = _operation("One model (OpenAI)", p.ModelObject, p.ErrorResponse)
    rerank = _operation("Rerank documents (Jina, vLLM)", p.RerankResponse, p.ErrorResponse, p.RerankRequest)
    score = _operation("Score pairs of texts (vLLM)", p.ScoreResponse, p.ErrorResponse, p.ScoreRequest)
    cohere = _operation("Rerank documents (Cohere v2)", p.CohereRerankResponse, p.ErrorResponse, p.RerankRequest)
    cohere_embed = _operation("Create embeddings of several types (Cohere v2)", p.CohereEmbedResponse, p.ErrorResponse,
                              p.CohereEmbedRequest)  # fmt: skip
    sparse = _operation("Sparse weights of a SPLADE model (TEI)", p.SparseResponse, p.ErrorResponse, p.SparseRequest)
    tokenize = _operation("Tokenize (vLLM)", p.TokenizeResponse, p.ErrorResponse, p.TokenizeRequest)
    detokenize = _operation("Detokenize (vLLM)", p.DetokenizeResponse, p.ErrorResponse, p.DetokenizeRequest)
    embed = _operation("Create embeddings (Ollama)", p.OllamaEmbedResponse, p.OllamaError, p.OllamaEmbedRequest)
    legacy = _operation("One embedding (Ollama, legacy)", p.OllamaEmbeddingsResponse, p.OllamaError, p.OllamaEmbeddingsRequest)
    ranges = {"summary": "A model's int8 ranges (embedq): low and high per dimension; ?dimensions=N for a Matryoshka size",
              "responses": {"200": {"description": "OK"}}}  # fmt: skip
    health = {"summary": "Liveness", "responses": {"200": {"description": "the gateway is up"}}}
    metrics = {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}
    files = {
        "summary": "Batch input files (OpenAI Files API); see docs/batches.md",
        "responses": {"200": {"description": "OpenAI's file object, or a list of them"}},
    }
    batches = {
        "summary": "Batches of /v1/embeddings requests (OpenAI Batches API); see docs/batches.md",
        "responses": {"200": {"description": "OpenAI's batch object, or a list of them"}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "embedq gateway",
            "version": version,
            "description": "OpenAI, Ollama, Aleph Alpha, Jina, Cohere and vLLM calls in front of a queue of vLLM workers.",
        },
        "paths": {
            "/v1/embeddings": {"post": embeddings},
            "/embeddings": {"post": {**embeddings, "summary": "Create embeddings (OpenAI; the Aleph Alpha client's path)"}},
            "/v1/models": {"get": models},
            "/models": {"get": models},
            "/v1/models/{id}": {"get": model},
            "/v1/quantization/{id}": {"get": ranges},
            "/v1/rerank": {"post": rerank},
            "/rerank": {"post": rerank},
            "/v2/rerank": {"post": cohere},
            "/v2/embed": {"post": cohere_embed},
            "/embed_sparse": {"post": sparse},
            "/score": {"post": score},
            "/v1/score": {"post": score},
            "/tokenize": {"post": tokenize},
            "/detokenize": {"post": detokenize},
            "/api/embed": {"post": embed},
            "/api/embeddings": {"post": legacy},
            "/api/tags": {"get": _operation("Served models (Ollama)", p.OllamaTags, p.OllamaError)},
            "/api/ps": {"get": _operation("Loaded models (Ollama): every served one", p.OllamaTags, p.OllamaError)},
            "/v1/files": {"post": files, "get": files},
            "/v1/files/{id}": {"get": files, "delete": files},
            "/v1/files/{id}/content": {"get": {**files, "summary": "A file's content: JSONL"}},
            "/v1/batches": {"post": batches, "get": batches},
            "/v1/batches/{id}": {"get": batches},
            "/v1/batches/{id}/cancel": {"post": batches},
            "/health": {"get": health},
            "/metrics": {"get": metrics},
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }  # fmt: skip
