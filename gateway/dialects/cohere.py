"""Cohere's rerank, ``POST /v2/rerank``: what the ``cohere`` client's ``ClientV2(base_url=...).rerank``
sends. Ranked as vLLM's rerank is (``dialects/vllm.py``); answered in Cohere's shape, which has no
documents and counts search units. Errors are Cohere's shape, ``{"message": "..."}`` (``http.py``).
"""

from __future__ import annotations

import uuid

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import RerankRequest, parse_body, validate
from gateway.dialects.vllm import ITEM_BYTES, documents_of, ranked
from gateway.http import json_response, off_loop, read_json, unless_disconnected
from gateway.service import Scores
from gateway.tenancy import calls


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


routes = [Route("/v2/rerank", rerank, methods=["POST"])]
