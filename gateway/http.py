"""HTTP plumbing shared by all routes: capped bodies, disconnects, and error rendering.

Errors are rendered in one place, in the shape of the dialect the client called: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` everywhere except Ollama's ``/api/`` paths,
which answer ``{"error": "..."}``, Cohere's ``/v2/`` ones, ``{"message": "..."}``, and TEI's
``/embed_sparse``, ``{"error": "...", "error_type": "..."}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message

from gateway.errors import (
    ApiError,
    Busy,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.tenancy import calls

T = TypeVar("T")
OFF_LOOP_BYTES = 256 * 1024
PIECE_VALUES = 1 << 15  # floats a streamed answer renders at a time: ~350 KB of JSON, about a millisecond
_ROWS = "\x00embedq: rows go here\x00"  # a string no answer's other fields hold
UNCOUNTED_BODY_BYTES = 64 * 1024  # of each body, not counted against the bodies-in-flight budget


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def json_response(body: bytes | dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def vectors_response(body: dict[str, Any], field: str, values_each: int) -> Response:
    """An answer whose ``body[field]`` lists vectors (numpy rows, or items holding one of
    ``values_each`` values): a small one at once; a large one streamed, ``PIECE_VALUES`` values
    rendered at a time with the loop let go between pieces. orjson holds the GIL while it writes,
    so one call on 21,845 vectors of 384 stalled every other request 0.8 s (a thread would too).
    The bytes are the same either way."""
    items = body[field]
    each = max(1, PIECE_VALUES // max(1, values_each))
    if len(items) <= each:
        return json_response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    head, tail = orjson.dumps({**body, field: _ROWS}).split(orjson.dumps(_ROWS))

    async def pieces() -> AsyncIterator[bytes]:
        yield head + b"["
        for start in range(0, len(items), each):
            if start:
                await asyncio.sleep(0)  # a send to a fast reader need not yield: other requests run here
            piece = orjson.dumps(items[start : start + each], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
            yield piece if start == 0 else b"," + piece
        yield b"]" + tail

    return StreamingResponse(pieces(), media_type="application/json")


class BodyBytes:
    """The bytes of request bodies being received, across all connections, against one budget
    (EMBEDQ_MAX_BODY_BYTES_IN_FLIGHT): stalled uploads hold at most that much memory. The first
    UNCOUNTED_BODY_BYTES of each body are free, so small requests are never refused for it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` (default
    EMBEDQ_MAX_BODY_BYTES), with 408 if it stalls (``receive_in_time``), and with 503 while the
    bytes of bodies in flight are at their budget (``BodyBytes``); 408 and 503 close the connection."""
    state = request.app.state
    limit = limit or state.settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes; at most {limit} are accepted")
    chunks: list[bytes] = []
    size = counted = 0
    started = asyncio.get_running_loop().time()
    try:
        more = True
        while more:
            message = await receive_in_time(request, size, started)
            if message["type"] == "http.disconnect":
                raise ClientGone()  # it hung up while sending: nobody to answer, nothing to log
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            uncounted = size - UNCOUNTED_BODY_BYTES - counted
            if uncounted > 0:
                if not state.bodies.take(uncounted):
                    raise Busy(
                        "the gateway is receiving as many request bodies as it holds at once; retry shortly",
                        headers={"Retry-After": str(state.settings.retry_after_s), "Connection": "close"},
                    )
                counted += uncounted
            chunks.append(chunk)
            more = message.get("more_body", False)
    finally:
        state.bodies.give(counted)
    return b"".join(chunks)


async def receive_in_time(request: Request, received: int, started: float) -> Message:
    """The request's next ASGI message, or 408 if the body pauses longer than EMBEDQ_BODY_TIMEOUT_S,
    or, once that long has passed since ``started``, falls below EMBEDQ_BODY_MIN_RATE bytes/s on
    average (``received`` bytes so far): a body that drips is stalled too."""
    settings = request.app.state.settings
    loop = asyncio.get_running_loop()
    now = loop.time()
    deadline = now + settings.body_timeout_s
    if settings.body_min_rate:
        deadline = min(deadline, started + max(settings.body_timeout_s, received / settings.body_min_rate))
    try:
        async with asyncio.timeout_at(deadline):
            return await request.receive()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body stalled: it must arrive with pauses under {settings.body_timeout_s:g}s and, after "
            f"the first {settings.body_timeout_s:g}s, at {settings.body_min_rate} bytes/s or more",
            headers={"Connection": "close"},
        ) from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """A query parameter that must be an integer from ``low`` to ``high``: a 400 naming it otherwise
    ("²" is a digit to ``str.isdigit``, and not to ``int``)."""
    raw = request.query_params.get(name, str(default))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9 and low <= int(raw) <= high):
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high} (got {raw[:20]!r})", param=name,
                             code="invalid_value")  # fmt: skip
    return int(raw)


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, also: tuple[str, ...] = (), limit: int | None = None) -> bytes:
    """The body of a JSON route: a JSON content type (or one of ``also``) first, 415 otherwise, so
    that no web page can post here with a form or plain text."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type) and content_type.partition(";")[0].strip().lower() not in also:
        wanted = " or ".join(["application/json", *(repr(t) for t in also if t)])
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type[:100] or 'none'!r}; "
            f"this endpoint takes {wanted})"
        )
    return await read_body(request, limit)


async def off_loop(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, in a thread when the body it works on is large: parsing and checking a
    16 MB body takes seconds, which must not stall every other request."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and so withdrawing its queued jobs) if the client leaves.

    Call only after the body has been read: from then on, the next ASGI message is the
    disconnect, if any. One watcher task per request, which cancels this one on a disconnect.
    """
    handler = asyncio.current_task()
    assert handler is not None, "called from a request's task"
    gone = False

    def on_disconnect(watcher: asyncio.Task) -> None:
        nonlocal gone
        if not watcher.cancelled() and watcher.exception() is None:
            gone = True
            handler.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            handler.uncancel()  # the cancellation was ours, turned into ClientGone
            raise ClientGone() from None
        raise
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def render_error(request: Request, exc: Exception) -> Response:
    """Starlette's handler for our errors and its own HTTP ones (async: no thread hop per error).
    A known path with a slash too many is redirected, relatively: never to a Host the client sent."""
    path = request.url.path
    if isinstance(exc, HTTPException) and exc.status_code == 404 and path.endswith("/"):
        known = {getattr(route, "path", None) for route in request.app.routes}
        if path.rstrip("/") in known:
            query = request.url.query
            return Response(status_code=307, headers={"Location": path.rstrip("/") + (f"?{query}" if query else "")})
    error = _as_api_error(request, exc)
    calls.note_error(error.code)
    return error_response(path, error)


JINA_PATHS = ("/v1/rerank", "/rerank")
TEI_PATHS = ("/embed_sparse",)


def _tei_type(status: int) -> str:
    """TEI's ``error_type`` for a status."""
    return {429: "Overloaded", 503: "Unhealthy"}.get(status, "Validation" if status < 500 else "Backend")


def error_response(path: str, error: ApiError) -> Response:
    """The error in the shape of the dialect that was called."""
    if path.startswith("/api/"):
        body: dict = {"error": error.message}
    elif path.startswith("/v2/"):
        body = {"message": error.message}  # Cohere's
    elif path in TEI_PATHS:
        body = {"error": error.message, "error_type": _tei_type(error.status)}
    else:
        body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
        if path in JINA_PATHS:  # Jina's clients (LangChain's, LlamaIndex's, jina-haystack) read "detail"
            body["detail"] = error.message
    return json_response(body, status=error.status, headers=error.headers)


def _as_api_error(request: Request, exc: Exception) -> ApiError:
    """Ours as they are; Starlette's routing errors (404, 405) in our words."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return MethodNotAllowed(f"{request.url.path} does not accept {request.method}")
    return NotFound(f"no such endpoint: {request.method} {request.url.path}")
