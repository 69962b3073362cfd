"""OpenAI dialect: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /v1/models`` (and ``/models``)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http import json_response, read_body, unless_disconnected
from gateway.protocol import EmbeddingsRequest, parse_body, parse_inputs, render_embeddings, render_models, validate


async def create_embeddings(request: Request) -> Response:
    state = request.app.state
    body = parse_body(await read_body(request, state.settings.max_body_bytes))
    req: EmbeddingsRequest = validate(EmbeddingsRequest, body)
    inputs, single = parse_inputs(req.input, state.settings.max_inputs)
    result = await unless_disconnected(request, state.embeddings.embed(req.model, inputs, single, req.dimensions))
    return json_response(render_embeddings(result.model, result.vectors, result.prompt_tokens, req.encoding_format))


async def list_models(request: Request) -> Response:
    return json_response(render_models(request.app.state.workers.routes(), created=int(time.time())))


routes = [
    Route("/v1/embeddings", create_embeddings, methods=["POST"]),
    Route("/embeddings", create_embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
]
