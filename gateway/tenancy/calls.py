"""One client request as tenancy sees it: whose key, which priority, what it came to.

``CallLedger`` (an ASGI middleware around the client endpoints) opens a ``Call`` for each
request and makes it ``current()`` for the request's task. The pieces fill it in as the
request goes: ``Auth.client`` the key, a dialect the priority it asked for (``ask_priority``),
``Service._run`` the model, inputs, tokens and the rate-limit headers, ``http.render_error``
the error code. When the response starts, the ledger adds the rate-limit headers; when it
ends, it records the call's usage (``usage.py``) and the fleet's activity (``activity.py``).
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.activity import Activity
from gateway.errors import Forbidden, InvalidRequest
from gateway.queue import BATCH, DEFAULT, INTERACTIVE
from gateway.tenancy.keys import ApiKey
from gateway.tenancy.limits import PRIORITY_NAMES, Decision
from gateway.tenancy.usage import UsageLedger

CLASS_OF_NAME = {"interactive": INTERACTIVE, "default": DEFAULT, "batch": BATCH}
NOT_CLIENT_CALLS = ("/internal/", "/admin/", "/metrics", "/health", "/openapi.json", "/ui", "/v1/files", "/v1/batches")


@dataclass
class Call:
    key: ApiKey | None = None
    priority: int = DEFAULT
    source: str = "api"
    model: str | None = None
    inputs: int = 0
    tokens: int = 0  # prompt tokens the client is told
    code: str | None = None  # the error it got
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("embedq_call", default=None)


def current() -> Call | None:
    return _CURRENT.get()


def enter(call: Call) -> None:
    """Make ``call`` current for the rest of this task (a batch's line, which has no ASGI request)."""
    _CURRENT.set(call)


def note_error(code: str | None) -> None:
    call = current()
    if call is not None:
        call.code = code or "error"


def ask_priority(value: int | str | None) -> None:
    """The request's ``priority``: vLLM's integer (below 0 interactive, 0 default, above 0 batch)
    or a class's name; 403 above what its key allows."""
    call = current()
    if call is None or value is None:
        return
    if isinstance(value, str):
        if value not in CLASS_OF_NAME:
            raise InvalidRequest(
                f"'priority' must be an integer or one of {', '.join(PRIORITY_NAMES)} (got {value!r})",
                param="priority",
                code="invalid_value",
            )
        wanted = CLASS_OF_NAME[value]
    else:
        wanted = INTERACTIVE if value < 0 else DEFAULT if value == 0 else BATCH
    if call.key is not None:
        allowed = CLASS_OF_NAME[call.key.limits.max_priority]
        if wanted < allowed:
            raise Forbidden(
                f"API key {call.key.name!r} may ask for priority {call.key.limits.max_priority!r} at most "
                f"(asked for {PRIORITY_NAMES[wanted]!r})",
                param="priority",
            )
    call.priority = wanted


def rate_headers(decision: Decision, key: ApiKey) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the key's per-minute limits."""
    headers: dict[str, str] = {}
    limits = key.limits
    if limits.rpm is not None and decision.requests_remaining is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(decision.requests_remaining)
        headers["x-ratelimit-reset-requests"] = duration(decision.requests_reset_s)
    if limits.tpm is not None and decision.tokens_remaining is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, decision.tokens_remaining))
        headers["x-ratelimit-reset-tokens"] = duration(decision.tokens_reset_s)
    return headers


def duration(seconds: float) -> str:
    """OpenAI's (Go's) way: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class CallLedger:
    def __init__(self, app: ASGIApp, usage: UsageLedger, activity: Activity):
        self._app, self._usage, self._activity = app, usage, activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(NOT_CLIENT_CALLS):
            return await self._app(scope, receive, send)
        call = Call()
        token = _CURRENT.set(call)
        status = 0
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if call.headers:
                    headers = list(message.get("headers", []))
                    present = {name.lower() for name, _ in headers}
                    headers += [(k.encode(), v.encode()) for k, v in call.headers.items() if k.encode() not in present]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_headers)
        finally:
            _CURRENT.reset(token)
            self._activity.call(call.model or "", status, time.perf_counter() - started, call.inputs, call.tokens)
            if call.key is not None or call.model is not None:
                code = call.code if status >= 400 else None
                if status == 0:
                    code = "client_closed"
                self._usage.record(
                    call.key.name if call.key else None,
                    call.model or "",
                    call.source,
                    inputs=call.inputs if status < 400 else 0,
                    tokens=call.tokens if status < 400 else 0,
                    code=code,
                    rejected=status == 429,
                )
