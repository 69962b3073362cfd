"""Cohere's v2 API: what the ``cohere`` client's ``ClientV2(base_url=...)`` sends.

- ``POST /v2/embed``: texts (``texts``, or ``inputs`` of text parts, joined by newlines) embedded
  once and answered in each of the ``embedding_types`` asked (float, int8, uint8, binary, ubinary,
  base64: ``vectors.py``), at ``output_dimension`` (a Matryoshka size). ``input_type`` picks the
  model's prompt as on every route; ``truncate`` END (the default) cuts over-long texts at the
  model's context and NONE refuses them. What embedq cannot do is refused by name, never ignored:
  START (cutting the beginning: workers cut the end), ``max_tokens`` below the model's context,
  images.
- ``POST /v2/rerank``: ranked as vLLM's rerank is (``dialects/vllm.py``); answered in Cohere's
  shape, which has no documents and counts search units.

Errors are Cohere's shape, ``{"message": "..."}`` (``http.py``).
"""

from __future__ import annotations

import uuid

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import CohereEmbedRequest, RerankRequest, parse_body, texts_of, validate
from gateway.dialects.vllm import ITEM_BYTES, documents_of, ranked
from gateway.errors import InvalidRequest
from gateway.http import json_response, off_loop, read_json, unless_disconnected
from gateway.service import Scores, renamed
from gateway.tenancy import calls
from gateway.vectors import base64_rows, packed_size

VALUE_BYTES = 12  # of an answer's JSON per value, about: what decides whether it is built off the loop


async def embed(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    body = await read_json(request)
    req: CohereEmbedRequest = validate(
        CohereEmbedRequest, await off_loop(len(body), parse_body, body, state.settings.max_request_inputs)
    )
    calls.ask_priority(req.priority)
    texts, field = _texts(req, state.settings.max_inputs)
    route = await state.service.route(req.model, key)
    if req.truncate == "START":
        raise InvalidRequest("'truncate': START (cutting the beginning of over-long texts) is not supported: embedq cuts "
                             "their end (END, the default) or refuses them (NONE)", param="truncate")  # fmt: skip
    if req.max_tokens is not None and req.max_tokens < route.card.max_input_tokens:
        raise InvalidRequest(
            f"'max_tokens' below model {req.model!r}'s context ({route.card.max_input_tokens} tokens) is not supported: "
            "texts are cut at the context (or refused with truncate NONE)",
            param="max_tokens",
        )
    if req.input_type == "image":
        raise InvalidRequest(f"'input_type': model {req.model!r} embeds texts, not images", param="input_type")
    work = state.service.embed(route, list(texts), single=False, key=key, dimensions=req.output_dimension,
                               truncate=req.truncate == "END", input_type=req.input_type)  # fmt: skip
    try:
        result = await unless_disconnected(request, work)
    except InvalidRequest as exc:
        raise renamed(exc, lambda i: f"{field}[{i}]", {"input": field, "dimensions": "output_dimension"}) from None
    types = list(dict.fromkeys(req.embedding_types))
    typed = {
        kind: await state.service.quantized(route, result.vectors, kind) for kind in types if kind not in ("float", "base64")
    }
    rows, dims = result.vectors.shape
    size = rows * sum(packed_size(dims, kind) for kind in types) * VALUE_BYTES
    return json_response(await off_loop(size, _embedded, types, result.vectors, typed, texts, result.prompt_tokens))


def _texts(req: CohereEmbedRequest, max_inputs: int) -> tuple[list[str], str]:
    """The texts to embed, and the field they came in: ``texts``, or ``inputs``' text parts."""
    given = [name for name in ("texts", "inputs", "images") if getattr(req, name) is not None]
    if len(given) != 1:
        raise InvalidRequest("send exactly one of 'texts' and 'inputs'" + (f" (got {' and '.join(given)})" if given else ""),
                             param="texts", code="missing_field" if not given else "invalid_value")  # fmt: skip
    field = given[0]
    if field == "images":
        raise InvalidRequest(f"'images': model {req.model!r} embeds texts, not images", param="images")
    if field == "texts":
        texts = req.texts or []
    else:
        texts = []
        for i, item in enumerate(req.inputs or []):
            for j, part in enumerate(item.content):
                where = f"inputs[{i}].content[{j}]"
                if part.type != "text":
                    raise InvalidRequest(f"'{where}': model {req.model!r} embeds texts, not images", param=where)
                if part.text is None:
                    raise InvalidRequest(f"'{where}.text' is a required field", param=f"{where}.text", code="missing_field")
            texts.append("\n".join(part.text or "" for part in item.content))
    return texts_of(texts, field, max_inputs), field


def _embedded(types: list[str], vectors: np.ndarray, typed: dict[str, np.ndarray], texts: list[str], tokens: int) -> bytes:
    embeddings: dict = {}
    for kind in types:
        if kind == "base64":  # Cohere's: each vector's float32 bytes, little-endian
            embeddings[kind] = base64_rows(vectors)
        else:
            embeddings[kind] = vectors if kind == "float" else typed[kind]
    meta = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}
    body = {"id": str(uuid.uuid4()), "embeddings": embeddings, "texts": texts, "meta": meta,
            "response_type": "embeddings_by_type"}  # fmt: skip
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


async def rerank(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    body = await read_json(request)
    req: RerankRequest = validate(
        RerankRequest, await off_loop(len(body), parse_body, body, request.app.state.settings.max_request_inputs)
    )
    calls.ask_priority(req.priority)
    documents = documents_of(req.documents)
    route = await state.service.route(req.model, key, task="score")
    work = state.service.score(route, [req.query] * len(documents), documents, key=key, names=("query", "documents"))
    scored: Scores = await unless_disconnected(request, work)
    return json_response(await off_loop(len(documents) * ITEM_BYTES, _reranked, req.top_n, scored))


def _reranked(top_n: int | None, scored: Scores) -> bytes:
    results = [{"index": i, "relevance_score": score} for i, score in ranked(scored.scores, top_n)]
    meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1, "input_tokens": scored.prompt_tokens}}
    return orjson.dumps({"id": str(uuid.uuid4()), "results": results, "meta": meta})


routes = [Route("/v2/embed", embed, methods=["POST"]), Route("/v2/rerank", rerank, methods=["POST"])]
