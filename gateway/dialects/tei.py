"""TEI's sparse embeddings, ``POST /embed_sparse``: what Text Embeddings Inference answers for a
SPLADE model (and what clients of it, such as Qdrant's and LangChain's TEI integrations, read):
per input, its nonzero weights as ``{"index": token id, "value": weight}``, by token id.

TEI serves one model, so its body names none: ``model`` is embedq's addition, needed only where
more than one sparse model is served. ``inputs`` is a text or a list of them; ``truncate``
(default false, as TEI) cuts over-long ones at the model's context, ``truncation_direction``
``Right`` only (workers cut the end); ``prompt_name`` picks one of the model's prompts. Errors are
TEI's shape, ``{"error": "...", "error_type": "Validation"}`` (``http.py``).

The weights are SPLADE's as vLLM computes them (max over an input's tokens of
``log(1 + relu(MLM logits))``), sent by the worker as a vocabulary-sized vector, as a dense
model's, and made sparse here.
"""

from __future__ import annotations

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import SparseRequest, parse_body, texts_of, validate
from gateway.errors import InvalidRequest
from gateway.http import json_response, off_loop, read_json, unless_disconnected
from gateway.service import renamed
from gateway.tenancy import calls

SPARSE_BYTES = 30  # of the answer's JSON per nonzero weight, about


async def embed_sparse(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    body = await read_json(request)
    req: SparseRequest = validate(SparseRequest, await off_loop(len(body), parse_body, body, state.settings.max_request_inputs))
    calls.ask_priority(req.priority)
    texts = texts_of([req.inputs] if isinstance(req.inputs, str) else req.inputs, "inputs", state.settings.max_inputs)
    if req.truncation_direction != "Right":
        raise InvalidRequest("'truncation_direction': only Right is supported: workers cut the end of over-long inputs",
                             param="truncation_direction")  # fmt: skip
    model = req.model or await state.service.sole_model("sparse", key)
    route = await state.service.route(model, key, task="sparse")
    work = state.service.embed(route, texts, single=False, key=key, truncate=req.truncate, prompt_name=req.prompt_name)
    try:
        vectors = (await unless_disconnected(request, work)).vectors
    except InvalidRequest as exc:
        raise renamed(exc, lambda i: f"inputs[{i}]", {"input": "inputs"}) from None
    nonzero = int(np.count_nonzero(vectors))
    return json_response(await off_loop(nonzero * SPARSE_BYTES, sparse_body, vectors))


def sparse_body(vectors: np.ndarray) -> bytes:
    """TEI's answer: per row, its nonzero weights by token id."""
    rows, columns = np.nonzero(vectors)
    values = vectors[rows, columns]
    ends = np.searchsorted(rows, np.arange(1, len(vectors) + 1))
    answer, start = [], 0
    for end in ends:
        answer.append([{"index": int(i), "value": float(v)} for i, v in zip(columns[start:end], values[start:end])])
        start = end
    return orjson.dumps(answer)


routes = [Route("/embed_sparse", embed_sparse, methods=["POST"])]
