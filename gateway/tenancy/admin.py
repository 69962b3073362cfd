"""The admin API, for admin tokens only (``Auth.admin``): keys and usage.

- ``GET /admin/v1/keys``: every key (never a secret); ``GET /admin/v1/keys/{name}``: one.
- ``POST /admin/v1/keys``: create one; the answer carries its secret (``key``), the only time
  it is shown.
- ``PATCH /admin/v1/keys/{name}``: change its limits or models (``null`` lifts a limit); they
  hold from its next request, on every replica within a second.
- ``DELETE /admin/v1/keys/{name}``: revoke it (401 from its next request on).
- ``GET /admin/v1/usage?from=&to=&by=key|model&granularity=hour|day&key=&model=&format=json|csv``:
  usage sums (``usage.py``); ``from``/``to`` are ISO 8601 times or dates (UTC unless they say), default the
  last 24 hours.

Errors have OpenAI's shape. Keys read from a file (``EMBEDQ_KEYS_FILE``) cannot be changed here.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.dialects.schemas import parse_body, validate
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.http import json_response, read_json
from gateway.tenancy.keys import ApiKey, KeysError, parse_duration
from gateway.tenancy.limits import Limits, PriorityName, parse_budget
from gateway.tenancy.usage import as_csv

DAY_S = 86400


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, gt=0)
    budget: str | None = Field(default=None, description="TOKENS/day or TOKENS/month")
    weight: float | None = Field(default=None, gt=0)
    max_priority: PriorityName | None = None
    # None: every model. An empty list would read as that too, where its sender meant none: refused.
    models: list[str] | None = Field(default=None, min_length=1)


class NewKey(KeyLimits):
    name: str = Field(min_length=1, max_length=64)
    expires_in: str | None = Field(default=None, description="a lifetime such as 90d, 12h, 30m")


def view(key: ApiKey) -> dict[str, Any]:
    """A key as the admin API shows it: everything but its hash."""
    now = time.time()
    return {
        "object": "api_key",
        "name": key.name,
        "state": "revoked" if key.revoked_at else "active" if key.usable(now) else "expired",
        "models": list(key.models) if key.models else None,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
        "limits": key.limits.as_dict(),
    }


def limit_changes(req: KeyLimits, sent: set[str]) -> dict[str, Any]:
    """The fields the request sent, as Limits fields (and models)."""
    changes: dict[str, Any] = {name: getattr(req, name) for name in sent if name not in ("budget", "name", "expires_in")}
    if "budget" in sent:
        try:
            changes["budget"], changes["budget_period"] = parse_budget(req.budget) if req.budget else (None, "month")
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="budget", code="invalid_value") from None
    for name in ("weight", "max_priority"):
        if name in changes and changes[name] is None:
            changes[name] = Limits.__dataclass_fields__[name].default
    return changes


def _store(request: Request):
    request.app.state.auth.admin(request)
    store = request.app.state.keys
    if store is None or not store.writable:
        raise Conflict(
            "this gateway's keys cannot be managed here: they come from a file (EMBEDQ_KEYS_FILE) or there are none; "
            "set EMBEDQ_KEYS_DB (one gateway) or EMBEDQ_KEYS_REDIS=true (replicas)"
        )
    return store


async def _in_store(work, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(work, *args, **kwargs)
    except KeysError as exc:
        message = str(exc)
        if message.startswith("no "):
            raise NotFound(message, param="name") from None
        raise InvalidRequest(message, param="name", code="invalid_value") from None


async def list_keys(request: Request) -> Response:
    store = _store(request)
    keys = await _in_store(store.all)
    return json_response({"object": "list", "data": [view(key) for key in keys]})


async def create_key(request: Request) -> Response:
    store = _store(request)
    raw = parse_body(await read_json(request))
    req: NewKey = validate(NewKey, raw)
    changes = limit_changes(req, set(raw) - {"models"})
    try:
        lifetime = parse_duration(req.expires_in) if req.expires_in else None
    except KeysError as exc:
        raise InvalidRequest(str(exc), param="expires_in", code="invalid_value") from None
    secret, key = await _in_store(store.create, req.name, req.models, lifetime, Limits(**changes))
    return json_response({**view(key), "key": secret}, status=201)


async def get_key(request: Request) -> Response:
    store = _store(request)
    return json_response(view(await _in_store(store.get, request.path_params["name"])))


async def update_key(request: Request) -> Response:
    store = _store(request)
    raw = parse_body(await read_json(request))
    req: KeyLimits = validate(KeyLimits, raw)
    key = await _in_store(store.update, request.path_params["name"], **limit_changes(req, set(raw)))
    return json_response(view(key))


async def revoke_key(request: Request) -> Response:
    store = _store(request)
    name = request.path_params["name"]
    await _in_store(store.revoke, name)
    return json_response(view(await _in_store(store.get, name)))


async def usage(request: Request) -> Response:
    request.app.state.auth.admin(request)
    query = request.query_params
    now = time.time()
    end = _when(query.get("to"), "to", now)
    start = _when(query.get("from"), "from", end - DAY_S)
    by: Literal["key", "model"] = _one_of(query.get("by", "key"), "by", ("key", "model"))
    granularity = _one_of(query.get("granularity", "hour"), "granularity", ("hour", "day"))
    csv = _one_of(query.get("format", "json"), "format", ("json", "csv")) == "csv"
    rows = await request.app.state.usage.report(
        start, end, by=by, granularity=granularity, key=query.get("key"), model=query.get("model")
    )
    if csv:
        headers = {"Content-Disposition": f'attachment; filename="embedq-usage-by-{by}.csv"'}
        return Response(as_csv(rows, by), media_type="text/csv", headers=headers)
    return json_response({"object": "list", "from": _iso(start), "to": _iso(end), "by": by, "data": rows})


def moment(text: str) -> float:
    """An ISO 8601 date or time (UTC unless it says) as a timestamp; ValueError if it is none."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _when(text: str | None, name: str, default: float) -> float:
    if not text:
        return default
    try:
        return moment(text)
    except ValueError:
        raise InvalidRequest(
            f"'{name}' must be an ISO 8601 date or time such as 2026-11-01 or 2026-11-01T12:00:00Z (got {text!r})",
            param=name,
            code="invalid_value",
        ) from None


def _one_of(value: str, name: str, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(allowed)} (got {value!r})", param=name, code="invalid_value")
    return value


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


routes = [
    Route("/admin/v1/keys", list_keys, methods=["GET"]),
    Route("/admin/v1/keys", create_key, methods=["POST"]),
    Route("/admin/v1/keys/{name}", get_key, methods=["GET"]),
    Route("/admin/v1/keys/{name}", update_key, methods=["PATCH"]),
    Route("/admin/v1/keys/{name}", revoke_key, methods=["DELETE"]),
    Route("/admin/v1/usage", usage, methods=["GET"]),
]
