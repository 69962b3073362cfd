"""The console's data, for a signed-in session only (``web.guarded``).

- ``GET /ui/api/session``: the session's CSRF token and expiry, and what this gateway is.
- ``GET /ui/api/fleet``: models (card, workers, queue, throughput) and workers (hello, state,
  last heartbeat, leases held, rates), for the whole fleet from any replica.
- ``GET /ui/api/activity``: the last hour in 10 s slots (``activity.py``): fleet requests,
  inputs, tokens, errors, 429s and p50/p95 latency per slot, batch lines' inputs and tokens,
  each queue's depth and oldest job per slot, and the hour's sums per model.
- ``POST /ui/api/embed``: the playground: texts embedded by a model, with their cosine
  similarities and a 2-D PCA projection.

Keys, usage and batches are the admin API's and the Batches API's own handlers (``__init__.py``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request
from starlette.responses import Response

from contract import software_version
from gateway.activity import SLOT_S, Slots
from gateway.dialects.schemas import parse_body, validate
from gateway.http import json_response, read_json
from gateway.metrics import LATENCY_BUCKETS
from gateway.registry import Route

RATE_WINDOW_S = 60  # throughput columns: the last minute
PLAYGROUND_TEXTS = 64


async def session(request: Request) -> Response:
    state = request.app.state
    keys = state.keys
    return json_response({
        "csrf": request.state.session.csrf,
        "expires_at": request.state.session.expires_at,
        "version": software_version(),
        "queue": state.settings.queue,
        "keys": "none" if keys is None else "managed" if keys.writable else "file",
    })  # fmt: skip


async def fleet(request: Request) -> Response:
    state = request.app.state
    routes: dict[str, Route] = state.workers.routes()
    views = state.workers.views()
    queues = await state.activity.queues()
    held = await state.queue.held([v.hello.worker_id for v in views if v.state != "gone"])
    recent = _sum(list((await state.activity.read(RATE_WINDOW_S)).values()))
    tags: dict[str, set[str]] = {}
    for view in views:
        for model in view.hello.models if view.state != "gone" else ():
            tags.setdefault(model, set()).update(view.hello.tags)
    models = []
    for name in sorted(routes):
        route, card = routes[name], routes[name].card
        queue = queues.get(route.checkpoint)
        models.append({
            "id": name, "checkpoint": route.checkpoint, "workers": route.workers, "dimensions": card.dimensions,
            "max_input_tokens": card.max_input_tokens, "matryoshka_dimensions": card.matryoshka_dimensions,
            "tasks": sorted(card.tasks), "description": card.description, "prompts": sorted(card.prompts),
            "tags": sorted(tags.get(name, ())), "registered_at": route.registered_at,
            "queue": {"depth": queue.depth, "leased": queue.leased, "oldest_age_s": round(queue.oldest_age_s, 3)}
            if queue else {"depth": 0, "leased": 0, "oldest_age_s": 0.0},
            "requests_per_s": recent[name + "\trequests"] / RATE_WINDOW_S,
            "inputs_per_s": recent[name + "\tinputs"] / RATE_WINDOW_S,
            "tokens_per_s": recent[name + "\ttokens"] / RATE_WINDOW_S,
        })  # fmt: skip
    workers = []
    for view in views:
        hello, worker_id = view.hello, view.hello.worker_id
        workers.append({
            "id": worker_id, "host": hello.host, "software": hello.software, "version": hello.version,
            "checkpoint": hello.checkpoint_name, "models": sorted(hello.models), "tags": hello.tags,
            "max_batch_items": hello.max_batch_items, "engine": hello.engine, "state": view.state,
            "heartbeat_at": view.heartbeat_at, "leases": held.get(worker_id, 0),
            "posts_per_s": recent[f"worker\t{worker_id}\tposts"] / RATE_WINDOW_S,
            "inputs_per_s": recent[f"worker\t{worker_id}\tinputs"] / RATE_WINDOW_S,
        })  # fmt: skip
    return json_response({"now": time.time(), "models": models, "workers": workers, "loops_down": state.loops.down()})


async def activity(request: Request) -> Response:
    slots: Slots = await request.app.state.activity.read()
    fields = ("requests", "inputs", "tokens", "errors", "rejected", "batch_inputs", "batch_tokens", "batch_failed")
    series: dict[str, list[float | None]] = {name: [] for name in (*fields, "p50", "p95")}
    per_model: dict[str, Counter[str]] = {}
    queues: dict[str, dict[str, list[float | None]]] = {}
    for i, counts in enumerate(slots.values()):
        fleet: Counter[str] = Counter()
        for name, n in counts.items():
            if name.startswith("queue\t"):
                _sample(queues, i, len(slots), name.split("\t"), n)
                continue
            model, _, field = name.rpartition("\t")
            if not model.startswith("worker\t"):
                fleet[field] += n
                per_model.setdefault(model, Counter())[field] += n
        for field in fields:
            series[field].append(fleet[field])
        series["p50"].append(_quantile(fleet, 0.5))
        series["p95"].append(_quantile(fleet, 0.95))
    models = {
        model or "(none)": {**{f: counts[f] for f in fields}, "p50": _quantile(counts, 0.5), "p95": _quantile(counts, 0.95)}
        for model, counts in sorted(per_model.items())
    }
    return json_response({"slot_s": SLOT_S, "start": min(slots) * SLOT_S, "series": series, "models": models,
                          "queues": queues})  # fmt: skip


def _sample(queues: dict[str, dict[str, list[float | None]]], i: int, count: int, parts: list[str], value: int) -> None:
    """A queue's sample (queue, key, depth|oldest_ms[, replica]) into slot i: depths summed over
    replicas, the oldest job the oldest of theirs, in seconds."""
    series = queues.setdefault(parts[1], {"depth": [None] * count, "oldest_s": [None] * count})
    if parts[2] == "depth":
        series["depth"][i] = (series["depth"][i] or 0) + value
    else:
        series["oldest_s"][i] = max(series["oldest_s"][i] or 0, value / 1000)


def _sum(slots: list[Counter[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for counts in slots:
        total.update(counts)
    return total


def _quantile(counts: Counter[str], q: float) -> float | None:
    """The q-quantile of a latency histogram (fields lat0..latN), in seconds, interpolated
    within its bucket; None without calls."""
    histogram = [counts[f"lat{i}"] for i in range(len(LATENCY_BUCKETS) + 1)]
    total = sum(histogram)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(histogram):
        if n and seen + n >= rank:
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            high = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
            return round(low + (high - low) * (rank - seen) / n, 4)
        seen += n
    return LATENCY_BUCKETS[-1]


class PlaygroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    texts: list[Annotated[str, StringConstraints(min_length=1, max_length=20_000)]] = Field(
        min_length=1, max_length=PLAYGROUND_TEXTS
    )


async def embed(request: Request) -> Response:
    req: PlaygroundRequest = validate(PlaygroundRequest, parse_body(await read_json(request)))
    service = request.app.state.service
    started = time.perf_counter()
    route = await service.route(req.model, None, frozenset())
    result = await service.embed(route, list(req.texts), single=False, key=None)
    latency_ms = (time.perf_counter() - started) * 1000
    vectors = result.vectors.astype(np.float64)
    return json_response({
        "model": result.model, "dimensions": int(vectors.shape[1]), "tokens": result.prompt_tokens,
        "latency_ms": round(latency_ms, 1), "similarity": np.round(vectors @ vectors.T, 4).tolist(),
        "points": _pca(vectors).round(4).tolist(),
    })  # fmt: skip


def _pca(vectors: np.ndarray) -> np.ndarray:
    """Each row's place on the first two principal components (zeros where there are fewer)."""
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = np.zeros((len(vectors), 2))
    top = components[:2]
    points[:, : len(top)] = centred @ top.T
    return points
