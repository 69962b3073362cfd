"""HTTP plumbing shared by all routes: capped bodies, disconnects, and error rendering.

Errors are rendered in one place, in the shape of the dialect the client called: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` everywhere except Ollama's ``/api/``
paths, which answer ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.errors import ApiError, MethodNotAllowed, NotFound, PayloadTooLarge

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def json_response(body: bytes | dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None  # it hung up while sending: nobody to answer, nothing to log
    return b"".join(chunks)


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
    """Starlette's handler for our errors and its own HTTP ones (async: no thread hop per error)."""
    return error_response(request.url.path, _as_api_error(request, exc))


def error_response(path: str, error: ApiError) -> Response:
    """The error in the shape of the dialect that was called."""
    if path.startswith("/api/"):
        body: dict = {"error": error.message}
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
