"""OpenAI dialect: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /v1/models`` (and ``/models``).

The Aleph Alpha client speaks this dialect too: it posts the same body to ``<host>/embeddings``
with ``hosting`` and ``tags`` added.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contract.messages import JobInput
from gateway.dialects.schemas import EmbeddingsRequest, json_type, parse_body, preview, validate
from gateway.errors import InvalidRequest, ModelNotFound, WrongType
from gateway.http import json_response, off_loop, query_int, read_json, unless_disconnected, vectors_response
from gateway.registry import Route as ModelRoute
from gateway.service import Embeddings, Service, check_dimensions, serves
from gateway.tenancy import calls
from gateway.tenancy.keys import ApiKey
from gateway.vectors import CALIBRATION_TEXTS, base64_rows

MAX_TOKEN_ID = 2**31 - 1
MAX_TOKEN_IDS = 131_072  # per input: more than any embedding model's context
INPUT_SHAPES = "a string, an array of strings, an array of token ids, or an array of arrays of token ids"


async def create_embeddings(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)  # before reading the body: strangers cost us nothing
    body = await read_json(request)
    req, inputs, single = await off_loop(len(body), parse_request, body, state.settings.max_inputs)
    calls.ask_priority(req.priority)
    result = await unless_disconnected(request, embedded(state.service, key, req, inputs, single))
    answer = embeddings_body(result.model, result.vectors, result.prompt_tokens, req.encoding_format)
    return vectors_response(answer, "data", result.vectors.shape[1])


async def embedded(
    service: Service, key: ApiKey | None, req: EmbeddingsRequest, inputs: list[JobInput], single: bool
) -> Embeddings:
    """A parsed request's vectors, before they are rendered: what a batch's line keeps
    (``batches/frames.py``), and renders as ``render_embeddings`` does for ``/v1/embeddings``."""
    tags = frozenset(req.tags or ())
    route = await service.route(req.model, key, tags)
    result = await service.embed(route, inputs, single=single, key=key, dimensions=req.dimensions, truncate=req.truncate,
                                 prompt_name=req.prompt_name, input_type=req.input_type, tags=tags)  # fmt: skip
    if req.output_dtype == "float":
        return result
    return dataclasses.replace(result, vectors=await service.quantized(route, result.vectors, req.output_dtype))


async def list_models(request: Request) -> Response:
    key = request.app.state.auth.client(request)
    routes = request.app.state.workers.routes()
    data = [_model(routes[name]) for name in sorted(routes) if key is None or key.allows(name)]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{id}``: what the openai client's ``models.retrieve`` asks."""
    key = request.app.state.auth.client(request)
    name = request.path_params["model"]
    if not name:
        raise HTTPException(404)  # "/v1/models/": the list, one slash too many (http.render_error redirects)
    route = request.app.state.workers.routes().get(name)
    if route is None or (key is not None and not key.allows(name)):
        raise ModelNotFound(f"model {name!r} not found", param="model")
    return json_response(_model(route))


async def quantization(request: Request) -> Response:
    """``GET /v1/quantization/{model}?dimensions=N``, an embedq extension: the per-dimension ranges
    int8 and uint8 vectors of the model are made with (``vectors.py``), for a client that quantizes
    floats it keeps or dequantizes what it got. Calibrated now if no request asked for int8 yet."""
    state = request.app.state
    key = state.auth.client(request)
    route = await state.service.route(request.path_params["model"], key)
    dimensions = query_int(request, "dimensions", route.card.dimensions, 1, route.card.dimensions)
    check_dimensions(route, dimensions)
    ranges = await state.service.ranges(route, dimensions)
    body = {"model": route.model, "dimensions": dimensions, "low": ranges[0], "high": ranges[1],
            "calibration_texts": CALIBRATION_TEXTS}  # fmt: skip
    return json_response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


def _model(route: ModelRoute) -> dict[str, Any]:
    """OpenAI's model object, with what a client must know to use the model: its sizes, its
    prompts (by the name ``prompt_name`` or ``input_type`` picks them; the default one, if any, goes
    before a text whose request names none) and whether its vectors are unit-length."""
    card = route.card
    return {"id": route.model, "object": "model", "created": int(route.registered_at), "owned_by": "embedq",
            "tasks": serves(route), "dimensions": card.dimensions, "max_input_tokens": card.max_input_tokens,
            "matryoshka_dimensions": card.matryoshka_dimensions, "prompts": card.prompts,
            "default_prompt": card.default_prompt or None, "normalized": card.normalized}  # fmt: skip


def parse_request(body: bytes, max_inputs: int) -> tuple[EmbeddingsRequest, list[JobInput], bool]:
    req: EmbeddingsRequest = validate(EmbeddingsRequest, parse_body(body))
    return req, *parse_inputs(req.input, max_inputs)


def parse_inputs(raw: Any, max_inputs: int) -> tuple[list[JobInput], bool]:
    """The inputs of a request as texts or token-id lists, and whether it was a single input.
    Token-id lists are bounded before their ids are looked at (MAX_TOKEN_IDS each); the model's
    own context bounds them again before any job is built (embeddings.py)."""
    if isinstance(raw, str):
        _check_text(raw, "input")
        return [raw], True
    if not isinstance(raw, list):
        raise WrongType(f"'input' must be {INPUT_SHAPES}, got {json_type(raw)}", param="input")
    if not raw:
        raise InvalidRequest("'input' must not be an empty array", param="input", code="invalid_value")
    if _all_ints(raw):
        _check_ids(raw, "input")
        return [raw], True
    if len(raw) > max_inputs:
        raise InvalidRequest(
            f"'input' has {len(raw)} items; at most {max_inputs} are allowed per request",
            param="input",
            code="too_many_inputs",
        )
    if _is_int(raw[0]):
        bad = next(i for i, x in enumerate(raw) if not _is_int(x))
        raise WrongType(f"'input[{bad}]' must be a token id like input[0], got {json_type(raw[bad])}", param=f"input[{bad}]")
    if not isinstance(raw[0], (str, list)):
        raise WrongType(
            f"'input[0]' must be a string, a token id or an array of token ids, got {json_type(raw[0])}", param="input[0]"
        )
    texts = isinstance(raw[0], str)
    if not texts:
        _check_lengths(raw)
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if texts and isinstance(item, str):
            _check_text(item, where)
        elif not texts and isinstance(item, list) and (not item or _all_ints(item)):
            _check_ids(item, where)
        else:
            expected = "a string like input[0]" if texts else "an array of token ids"
            raise WrongType(f"'{where}' must be {expected}, got {json_type(item)}", param=where)
    return raw, False


def _check_text(text: str, where: str) -> None:
    if not text:
        raise InvalidRequest(f"'{where}' must not be an empty string", param=where, code="invalid_value")


def _check_lengths(items: list) -> None:
    for i, item in enumerate(items):
        if isinstance(item, list) and len(item) > MAX_TOKEN_IDS:
            raise InvalidRequest(
                f"'input[{i}]' has {len(item)} token ids; no model takes more than {MAX_TOKEN_IDS}",
                param=f"input[{i}]",
                code="context_length_exceeded",
            )


def _check_ids(ids: list[int], where: str) -> None:
    if not ids:
        raise InvalidRequest(f"'{where}' must not be an empty array of token ids", param=where, code="invalid_value")
    if len(ids) > MAX_TOKEN_IDS:
        raise InvalidRequest(
            f"'{where}' has {len(ids)} token ids; no model takes more than {MAX_TOKEN_IDS}",
            param=where,
            code="context_length_exceeded",
        )
    if min(ids) < 0 or max(ids) > MAX_TOKEN_ID:  # min and max run in C: no per-id Python
        j = next(j for j, token in enumerate(ids) if not 0 <= token <= MAX_TOKEN_ID)
        raise InvalidRequest(f"'{where}[{j}]' is not a valid token id (got {preview(ids[j])})", param=where, code="invalid_value")


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, and not a token id


def _all_ints(items: list) -> bool:
    return bool(items) and set(map(type, items)) == {int}  # in C: no per-item Python


def render_embeddings(model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> bytes:
    """The OpenAI list response, from a (n, dims) float32 matrix, without per-float Python work
    (``/v1/embeddings`` streams the same bytes when they are many: ``vectors_response``)."""
    return orjson.dumps(embeddings_body(model, vectors, prompt_tokens, encoding_format), option=orjson.OPT_SERIALIZE_NUMPY)


def embeddings_body(model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> dict[str, Any]:
    """Integer vectors (an ``output_dtype``) are lists whatever the ``encoding_format``: the openai
    client asks for base64 unless told otherwise and reads it as float32, which integer bytes are not."""
    if encoding_format == "base64" and vectors.dtype.kind == "f":
        items: list = base64_rows(vectors)
    else:
        items = list(vectors)  # orjson writes float32 rows in their shortest exact form
    data = [{"object": "embedding", "embedding": item, "index": i} for i, item in enumerate(items)]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return body


routes = [
    Route("/v1/embeddings", create_embeddings, methods=["POST"]),
    Route("/embeddings", create_embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
    Route("/v1/quantization/{model:path}", quantization, methods=["GET"]),
    Route("/models/{model:path}", retrieve_model, methods=["GET"]),
]
