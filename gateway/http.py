"""HTTP plumbing shared by all routes: capped bodies, disconnects, and error rendering.

Errors are rendered in one place, in the shape of the dialect the client called: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` everywhere except Ollama's ``/api/`` paths,
which answer ``{"error": "..."}``, and Cohere's ``/v2/`` ones, ``{"message": "..."}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import ApiError, MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from gateway.tenancy import calls

T = TypeVar("T")
OFF_LOOP_BYTES = 256 * 1024


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def json_response(body: bytes | dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed EMBEDQ_MAX_BODY_BYTES,
    and with 408 (closing the connection) if it takes longer than EMBEDQ_BODY_TIMEOUT_S to arrive."""
    settings = request.app.state.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None  # it hung up while sending: nobody to answer, nothing to log
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.body_timeout_s:g}s", headers={"Connection": "close"}
        ) from None
    return b"".join(chunks)


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, also: tuple[str, ...] = ()) -> bytes:
    """The body of a JSON route: a JSON content type (or one of ``also``) first, 415 otherwise, so
    that no web page can post here with a form or plain text."""
    content_type = request.headers.get("content-type", "")
    if not is_json(content_type) and content_type.partition(";")[0].strip().lower() not in also:
        wanted = " or ".join(["application/json", *(repr(t) for t in also if t)])
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type[:100] or 'none'!r}; "
            f"this endpoint takes {wanted})"
        )
    return await read_body(request)


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


def error_response(path: str, error: ApiError) -> Response:
    """The error in the shape of the dialect that was called."""
    if path.startswith("/api/"):
        body: dict = {"error": error.message}
    elif path.startswith("/v2/"):
        body = {"message": error.message}  # Cohere's
    else:
        body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return json_response(body, status=error.status, headers=error.headers)


def _as_api_error(request: Request, exc: Exception) -> ApiError:
    """Ours as they are; Starlette's routing errors (404, 405) in our words."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return MethodNotAllowed(f"{request.url.path} does not accept {request.method}")
    return NotFound(f"no such endpoint: {request.method} {request.url.path}")
