"""The OpenAPI 3.1 document of the public endpoints, built from the wire models in dialects/schemas.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.dialects import schemas as p

ERRORS = {
    400: "invalid request",
    404: "unknown model or path",
    413: "body too large",
    422: "a field of the wrong type",
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
    requests: list[type[BaseModel]] = [p.EmbeddingsRequest, p.OllamaEmbedRequest, p.OllamaEmbeddingsRequest]
    responses: list[type[BaseModel]] = [
        p.EmbeddingsResponse,
        p.ModelList,
        p.ErrorResponse,
        p.OllamaEmbedResponse,
        p.OllamaEmbeddingsResponse,
        p.OllamaTags,
        p.OllamaError,
    ]
    modes: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in requests),
        *((m, "serialization") for m in responses),
    ]
    _, schemas = models_json_schema(
        modes,
        ref_template="#/components/schemas/{model}",
    )
    embeddings = _operation("Create embeddings (OpenAI)", p.EmbeddingsResponse, p.ErrorResponse, p.EmbeddingsRequest)
    models = _operation("Models with a live worker (OpenAI)", p.ModelList, p.ErrorResponse)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "embedq gateway",
            "version": version,
            "description": "OpenAI, Ollama and Aleph Alpha embeddings in front of a queue of vLLM workers.",
        },
        "paths": {
            "/v1/embeddings": {"post": embeddings},
            "/embeddings": {"post": {**embeddings, "summary": "Create embeddings (OpenAI; the Aleph Alpha client's path)"}},
            "/v1/models": {"get": models},
            "/models": {"get": models},
            "/api/embed": {
                "post": _operation("Create embeddings (Ollama)", p.OllamaEmbedResponse, p.OllamaError, p.OllamaEmbedRequest)
            },
            "/api/embeddings": {
                "post": _operation(
                    "One embedding (Ollama, legacy)", p.OllamaEmbeddingsResponse, p.OllamaError, p.OllamaEmbeddingsRequest
                )
            },
            "/api/tags": {"get": _operation("Served models (Ollama)", p.OllamaTags, p.OllamaError)},
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "the gateway is up"}}}},
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}
            },
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }
