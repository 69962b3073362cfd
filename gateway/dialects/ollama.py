"""Ollama dialect: ``POST /api/embed``, legacy ``POST /api/embeddings``, and what Ollama tools probe:
``GET /api/tags``, ``POST /api/show``, ``GET /api/ps``, ``GET /api/version``, ``GET /``.

As Ollama's own server: no cap on the number of inputs (tools such as langchain-ollama send every
text in one call; the body size bounds it), inputs are truncated to the context unless
``truncate`` is false, ``dimensions`` cuts the vectors to any smaller size (a size at or above
the model's own is ignored), an empty input answers an empty list, durations are nanoseconds,
and ``name:latest`` names the same model as ``name``. Errors are ``{"error": "..."}`` (rendered
in ``http.py``). Unlike Ollama's, vectors are what every route gives (``service.py``): the
model's own, as sentence-transformers gives them, unit-length for a model that normalises (most
do) and re-normalised after a cut only then.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.dialects.schemas import OllamaEmbeddingsRequest, OllamaEmbedRequest, json_type, parse_body, validate
from gateway.errors import InvalidRequest, WrongType
from gateway.http import json_response, off_loop, read_json, unless_disconnected, vectors_response
from gateway.registry import Route as ModelRoute
from gateway.tenancy import calls
from gateway.vectors import cut_to

OLLAMA_VERSION = "0.12.0"  # the Ollama API these endpoints follow; tools gate features on it
KEEP_ALIVE = timedelta(minutes=5)  # what /api/ps says of a model's expiry: workers keep it loaded


async def embed(request: Request) -> Response:
    started = time.perf_counter_ns()
    state = request.app.state
    key = state.auth.client(request)
    req: OllamaEmbedRequest = validate(OllamaEmbedRequest, await _json(request))
    calls.ask_priority(req.priority)
    inputs = _parse_inputs(req.input)
    route = await state.service.route(_model_name(request, req.model), key)
    if not inputs:  # Ollama answers an empty input with no vectors (it "loads the model")
        return json_response({"model": req.model, "embeddings": []})
    # Not said: cut, as Ollama does (unless the model embeds over-long inputs in chunks).
    truncate = req.truncate if req.truncate is not None or route.card.chunked else True
    work = state.service.embed(route, inputs, single=isinstance(req.input, str), key=key, truncate=truncate)
    result = await unless_disconnected(request, work)
    vectors = result.vectors
    if req.dimensions is not None and req.dimensions < vectors.shape[1]:
        vectors = cut_to(vectors, req.dimensions, result.normalized)  # any smaller size, as Ollama
    body = {
        "model": req.model,
        "embeddings": list(vectors),
        "total_duration": time.perf_counter_ns() - started,
        "load_duration": 0,  # workers keep their model loaded
        "prompt_eval_count": result.prompt_tokens,
    }
    return vectors_response(body, "embeddings", vectors.shape[1])


async def embeddings(request: Request) -> Response:
    """The legacy endpoint: one ``prompt`` in, one ``embedding`` out."""
    state = request.app.state
    key = state.auth.client(request)
    req: OllamaEmbeddingsRequest = validate(OllamaEmbeddingsRequest, await _json(request))
    if not req.model:
        raise InvalidRequest("model is required", param="model")
    route = await state.service.route(_model_name(request, req.model), key)
    if not req.prompt:
        return json_response({"embedding": []})
    work = state.service.embed(route, [req.prompt], single=True, key=key, truncate=True)
    result = await unless_disconnected(request, work)
    return json_response(orjson.dumps({"embedding": result.vectors[0]}, option=orjson.OPT_SERIALIZE_NUMPY))


async def tags(request: Request) -> Response:
    """The served models, in the shape of Ollama's local model list."""
    return json_response({"models": [_listed(route) for route in _visible(request)]})


async def running(request: Request) -> Response:
    """``GET /api/ps``: the models loaded now; every served model is (its workers keep it loaded)."""
    expires = (datetime.now(UTC) + KEEP_ALIVE).isoformat()
    models = [{**_listed(route), "expires_at": expires, "size_vram": 0, "context_length": route.card.max_input_tokens}
              for route in _visible(request)]  # fmt: skip
    return json_response({"models": models})


async def show(request: Request) -> Response:
    """``POST /api/show``: one model's details, as Ollama describes a model."""
    state = request.app.state
    key = state.auth.client(request)
    data = await _json(request)
    name = data.get("model") or data.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'model' is a required field", param="model")
    route = await state.service.route(_model_name(request, name), key, task="tokenize")  # any served model
    card = route.card
    family = "bert"  # what Ollama reports for embedding models' architectures: its key prefix below
    return json_response({
        "modelfile": f"# served by embedq from checkpoint {route.checkpoint}\nFROM {route.checkpoint}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": _details(),
        "model_info": {
            "general.architecture": family,
            "general.basename": route.model,
            f"{family}.context_length": card.max_input_tokens,
            f"{family}.embedding_length": card.dimensions,
        },
        "capabilities": ["embedding"] if "embed" in card.tasks else [],
        "modified_at": datetime.fromtimestamp(route.registered_at, UTC).isoformat(),
    })  # fmt: skip


async def version(request: Request) -> Response:
    return json_response({"version": OLLAMA_VERSION})


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")  # the words Ollama's tools probe for


def _visible(request: Request) -> list[ModelRoute]:
    key = request.app.state.auth.client(request)
    routes = request.app.state.workers.routes()
    return [routes[name] for name in sorted(routes) if key is None or key.allows(name)]


def _listed(route: ModelRoute) -> dict[str, Any]:
    tagged = route.model if ":" in route.model else f"{route.model}:latest"
    return {
        "name": tagged,
        "model": tagged,
        "modified_at": datetime.fromtimestamp(route.registered_at, UTC).isoformat(),
        "size": 0,  # the weights live on the workers
        "digest": hashlib.sha256(f"{route.checkpoint}:{route.model}".encode()).hexdigest(),
        "details": _details(),
    }


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "vllm", "family": "", "families": None, "parameter_size": "",
            "quantization_level": ""}  # fmt: skip


async def _json(request: Request) -> dict[str, Any]:
    # Ollama's own documented examples post JSON with curl's default form type, or none at all.
    body = await read_json(request, also=("application/x-www-form-urlencoded", ""))
    return await off_loop(len(body), parse_body, body, request.app.state.settings.max_request_inputs)


def _model_name(request: Request, name: str) -> str:
    """Ollama spells an untagged model ``name:latest``; both reach the same model."""
    base = name.removesuffix(":latest")
    if base != name and not request.app.state.workers.knows(name):
        return base
    return name


def _parse_inputs(raw: Any) -> list[str]:
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if not isinstance(raw, list):
        raise WrongType(f"'input' must be a string or an array of strings, got {json_type(raw)}", param="input")
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise WrongType(f"'input[{i}]' must be a string, got {json_type(item)}", param=f"input[{i}]")
    return raw


routes = [
    Route("/api/embed", embed, methods=["POST"]),
    Route("/api/embeddings", embeddings, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", running, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/", root, methods=["GET", "HEAD"]),
]
