"""Ollama dialect: ``POST /api/embed``, legacy ``POST /api/embeddings``, ``GET /api/tags``.

As Ollama's own server: inputs are truncated to the context unless ``truncate`` is false,
vectors are L2-normalised, an empty input answers an empty list, durations are nanoseconds,
and ``name:latest`` names the same model as ``name``. Errors are ``{"error": "..."}``
(rendered in ``http.py``).
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import OllamaEmbeddingsRequest, OllamaEmbedRequest, json_type, parse_body, validate
from gateway.embeddings import l2_normalize
from gateway.errors import InvalidRequest, WrongType
from gateway.http import json_response, off_loop, read_json, unless_disconnected


async def embed(request: Request) -> Response:
    started = time.perf_counter_ns()
    state = request.app.state
    key = state.auth.client(request)
    req: OllamaEmbedRequest = validate(OllamaEmbedRequest, await _json(request))
    model = _model_name(request, req.model)
    inputs = _parse_inputs(req.input, state.settings.max_inputs)
    route = await state.embeddings.route(model, key)
    if not inputs:  # Ollama answers an empty input with no vectors (it "loads the model")
        return json_response({"model": req.model, "embeddings": []})
    truncate = req.truncate is not False
    work = state.embeddings.embed(
        route, inputs, single=isinstance(req.input, str), dimensions=req.dimensions, truncate=truncate, key=key
    )
    result = await unless_disconnected(request, work)
    body = {
        "model": req.model,
        "embeddings": list(l2_normalize(result.vectors)),
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": 0,  # workers keep their model loaded
        "prompt_eval_count": result.prompt_tokens,
    }
    return json_response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


async def embeddings(request: Request) -> Response:
    """The legacy endpoint: one ``prompt`` in, one ``embedding`` out."""
    state = request.app.state
    key = state.auth.client(request)
    req: OllamaEmbeddingsRequest = validate(OllamaEmbeddingsRequest, await _json(request))
    if not req.model:
        raise InvalidRequest("model is required", param="model")
    route = await state.embeddings.route(_model_name(request, req.model), key)
    if not req.prompt:
        return json_response({"embedding": []})
    work = state.embeddings.embed(route, [req.prompt], single=True, truncate=True, key=key)
    result = await unless_disconnected(request, work)
    return json_response(orjson.dumps({"embedding": l2_normalize(result.vectors)[0]}, option=orjson.OPT_SERIALIZE_NUMPY))


async def tags(request: Request) -> Response:
    """The served models, in the shape of Ollama's local model list."""
    key = request.app.state.auth.client(request)
    models = []
    for name, route in sorted(request.app.state.workers.routes().items()):
        if key is not None and not key.allows(name):
            continue
        tagged = name if ":" in name else f"{name}:latest"
        models.append(
            {
                "name": tagged,
                "model": tagged,
                "modified_at": datetime.fromtimestamp(route.registered_at, UTC).isoformat(),
                "size": 0,  # the weights live on the workers
                "digest": hashlib.sha256(f"{route.checkpoint}:{name}".encode()).hexdigest(),
                "details": {
                    "parent_model": "",
                    "format": "vllm",
                    "family": "",
                    "families": None,
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
        )
    return json_response({"models": models})


async def _json(request: Request) -> dict[str, Any]:
    # Ollama's own documented examples post JSON with curl's default form type, or none at all.
    body = await read_json(request, also=("application/x-www-form-urlencoded", ""))
    return await off_loop(len(body), parse_body, body)


def _model_name(request: Request, name: str) -> str:
    """Ollama spells an untagged model ``name:latest``; both reach the same model."""
    base = name.removesuffix(":latest")
    if base != name and not request.app.state.workers.knows(name):
        return base
    return name


def _parse_inputs(raw: Any, max_inputs: int) -> list[str]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise WrongType(f"'input' must be a string or an array of strings, got {json_type(raw)}", param="input")
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise WrongType(f"'input[{i}]' must be a string, got {json_type(item)}", param=f"input[{i}]")
    if len(raw) > max_inputs:
        raise InvalidRequest(f"'input' has {len(raw)} items; at most {max_inputs} are allowed per request", param="input")
    return raw


routes = [
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
]
