"""What vLLM serves beyond embeddings, in its shapes: ``POST /v1/rerank`` and ``/rerank`` (Jina's
rerank API, which vLLM serves too), ``POST /score`` and ``/v1/score``, ``POST /tokenize`` and
``/detokenize``. Errors are OpenAI's shape, as vLLM's are.

Rerank and score run on a cross-encoder's own scores, or on an embedding model's cosine
similarity (``service.score``). Over-long texts are cut to the context unless the request says
``truncate: false``. Token counts include the prompts a model puts before texts.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import (
    DetokenizeRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    json_type,
    parse_body,
    validate,
)
from gateway.errors import InvalidRequest, WrongType
from gateway.http import json_response, off_loop, read_json, unless_disconnected
from gateway.service import Scores
from gateway.tenancy import calls


async def rerank(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    req: RerankRequest = validate(RerankRequest, await _json(request))
    calls.ask_priority(req.priority)
    documents = documents_of(req.documents)
    route = await state.service.route(req.model, key, task="score")
    work = state.service.score(route, [req.query] * len(documents), documents, key=key, names=("query", "documents"),
                               truncate=req.truncate)  # fmt: skip
    scored: Scores = await unless_disconnected(request, work)
    return json_response(await off_loop(len(documents) * ITEM_BYTES, _reranked, req, documents, scored))


ITEM_BYTES = 64  # about what a result of many (a rank, a score) weighs, for off_loop: 20,000 held the loop 0.15 s


def _reranked(req: RerankRequest, documents: list[str], scored: Scores) -> bytes:
    results = [{"index": i, "relevance_score": score, **({"document": {"text": documents[i]}} if req.return_documents else {})}
               for i, score in ranked(scored.scores, req.top_n)]  # fmt: skip
    usage = {"prompt_tokens": scored.prompt_tokens, "total_tokens": scored.prompt_tokens}
    return orjson.dumps({"id": f"rerank-{uuid.uuid4().hex}", "model": req.model, "results": results, "usage": usage})


async def score(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    req: ScoreRequest = validate(ScoreRequest, await _json(request))
    calls.ask_priority(req.priority)
    first, second = _pairs(req.text_1, req.text_2)
    route = await state.service.route(req.model, key, task="score")
    work = state.service.score(route, first, second, key=key, names=("text_1", "text_2"), truncate=req.truncate)
    scored: Scores = await unless_disconnected(request, work)
    return json_response(await off_loop(len(scored.scores) * ITEM_BYTES, _scored, req.model, scored))


def _scored(model: str, scored: Scores) -> bytes:
    data = [{"index": i, "object": "score", "score": value} for i, value in enumerate(scored.scores)]
    return orjson.dumps({
        "id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model, "data": data,
        "usage": {"prompt_tokens": scored.prompt_tokens, "total_tokens": scored.prompt_tokens},
    })  # fmt: skip


async def tokenize(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    req: TokenizeRequest = validate(TokenizeRequest, await _json(request))
    route = await state.service.route(req.model, key, task="tokenize")
    work = state.service.tokenize(
        route, [req.prompt], key=key, special_tokens=req.add_special_tokens, prompt_name=req.prompt_name
    )
    tokens = await unless_disconnected(request, work)
    ids = tokens.token_ids[0]
    return json_response({"count": len(ids), "max_model_len": tokens.max_input_tokens, "tokens": ids})


async def detokenize(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    req: DetokenizeRequest = validate(DetokenizeRequest, await _json(request))
    if min(req.tokens) < 0:
        raise InvalidRequest("'tokens' are token ids, 0 or more", param="tokens", code="invalid_value")
    route = await state.service.route(req.model, key, task="tokenize")
    texts = await unless_disconnected(request, state.service.detokenize(route, [req.tokens], key=key))
    return json_response({"prompt": texts[0]})


def documents_of(raw: list[Any]) -> list[str]:
    """Documents as texts: strings, or objects with a "text" (Jina's form)."""
    texts = []
    for i, item in enumerate(raw):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise WrongType(f"'documents[{i}]' must be a string or an object with a \"text\", got {json_type(item)}",
                            param=f"documents[{i}]")  # fmt: skip
        if not text:
            raise InvalidRequest(f"'documents[{i}]' must not be empty", param=f"documents[{i}]", code="invalid_value")
        texts.append(text)
    return texts


def ranked(scores: list[float], top_n: int | None) -> list[tuple[int, float]]:
    """(index, score), the best first; the first top_n of them."""
    order = sorted(enumerate(scores), key=lambda pair: pair[1], reverse=True)
    return order[:top_n] if top_n is not None else order


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """vLLM's pairing: one with one, one with each of many, or pairwise."""
    first = [text_1] if isinstance(text_1, str) else text_1
    second = [text_2] if isinstance(text_2, str) else text_2
    for name, texts in (("text_1", first), ("text_2", second)):
        if not texts or not all(texts):
            raise InvalidRequest(f"'{name}' must be a text or a list of texts, none empty", param=name, code="invalid_value")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise InvalidRequest(f"'text_1' has {len(first)} texts and 'text_2' {len(second)}: pairwise, they must match",
                             param="text_2", code="invalid_value")  # fmt: skip
    return first, second


async def _json(request: Request) -> dict[str, Any]:
    body = await read_json(request)
    return await off_loop(len(body), parse_body, body, request.app.state.settings.max_request_inputs)


routes = [
    Route("/v1/rerank", rerank, methods=["POST"]),
    Route("/rerank", rerank, methods=["POST"]),
    Route("/score", score, methods=["POST"]),
    Route("/v1/score", score, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
]
