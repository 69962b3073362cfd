"""OpenAI's Files API (``purpose: "batch"``) and Batches API (``endpoint: "/v1/embeddings"``), in
OpenAI's shapes. A file or batch belongs to the key that made it; any other key is told it does
not exist (404), as OpenAI does. The work itself is the runner's (``runner.py``)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from gateway.auth import CONSOLE_ADMIN
from gateway.batches import frames
from gateway.batches.lines import MAX_FILE_BYTES
from gateway.batches.retention import expired, expires_at
from gateway.batches.runner import batch_object, no_usage
from gateway.batches.store import BatchRecord, FileRecord
from gateway.dialects.schemas import BatchRequest, FileUpload, parse_body, validate
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from gateway.http import json_response, off_loop, query_int, read_json, receive_in_time
from gateway.tenancy.keys import ApiKey

T = TypeVar("T")
Owned = TypeVar("Owned", FileRecord, BatchRecord)
WINDOW_S = {"24h": 86400}
FORM_SLACK = 64 * 1024  # a multipart body's own bytes around the file


def _owner(key: ApiKey | None) -> str:
    return key.name if key is not None else ""


def _viewer(request: Request) -> str | None:
    """Whose files and batches the caller sees: its key's; None (everyone's) for the console."""
    if request.scope.get(CONSOLE_ADMIN):
        return None
    return _owner(request.app.state.auth.client(request))


def _visible(record: Owned | None, viewer: str | None, what: str, ident: str) -> Owned:
    """The record, if the viewer may see it: its owner's, and (a file) not expired."""
    if record is None or (viewer is not None and record.owner != viewer):
        raise NotFound(f"no {what} {ident!r}", param=f"{what}_id")
    if isinstance(record, FileRecord) and expired(record, time.time()):
        raise NotFound(f"no {what} {ident!r}: it expired at {record.expires_at}", param=f"{what}_id")
    return record


# -- files -----------------------------------------------------------------------------------


async def upload_file(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("upload the file as multipart/form-data, with the fields 'file' and 'purpose'")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_FILE_BYTES + FORM_SLACK:
        raise PayloadTooLarge(f"the upload has {declared} bytes; a batch input file may have at most {MAX_FILE_BYTES}")
    async with _capped(request, MAX_FILE_BYTES + FORM_SLACK).form(max_files=1, max_fields=8) as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequest(f"'purpose' must be \"batch\" (got {purpose!r}): files here are batch input files",
                                 param="purpose", code="invalid_value")  # fmt: skip
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("'file' is a required field: the JSONL file to upload", param="file", code="missing_field")
        options: FileUpload = validate(FileUpload, _nested(form))
        size = upload.size or 0
        if size > MAX_FILE_BYTES:
            raise PayloadTooLarge(f"the file has {size} bytes; a batch input file may have at most {MAX_FILE_BYTES}")
        store, now = state.batches, int(time.time())
        asked = options.expires_after.model_dump() if options.expires_after else None
        expiry = expires_at(now, asked, state.settings.file_retention_s)
        record = FileRecord(f"file-{secrets.token_hex(12)}", _owner(key), "batch", upload.filename or "upload.jsonl", size,
                            now, await store.next_seq(), expires_at=expiry)  # fmt: skip
        await upload.seek(0)
        await store.put_file(record, upload.file)
    return json_response(record.as_openai())


def _nested(form: FormData) -> dict[str, Any]:
    """A form's ``a[b]`` fields as ``{"a": {"b": ...}}`` (how OpenAI's clients send an object),
    its digit strings as numbers; the file and purpose are read apart."""
    nested: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in ("file", "purpose") or not isinstance(value, str):
            continue
        outer, _, inner = name.partition("[")
        parsed: Any = int(value) if value.isascii() and value.isdigit() else value
        if not inner.endswith("]"):
            nested[name] = parsed
        elif isinstance(slot := nested.setdefault(outer, {}), dict):
            slot[inner[:-1]] = parsed
        else:
            raise InvalidRequest(f"'{outer}' is sent both as a value and as fields ({name})", param=outer,
                                 code="invalid_value")  # fmt: skip
    return nested


def _capped(request: Request, limit: int) -> Request:
    """The request, its body refused with 413 past ``limit`` bytes as it arrives, and with 408 if
    it stalls (the form parser spools the file to disk, so it holds no budget of bodies in flight)."""
    size = 0
    started = asyncio.get_running_loop().time()

    async def receive() -> Message:
        nonlocal size
        message = await receive_in_time(request, size, started)
        size += len(message.get("body", b""))
        if size > limit:
            raise PayloadTooLarge(f"the upload exceeds {limit} bytes; a batch input file may have at most {MAX_FILE_BYTES}")
        return message

    return Request(request.scope, receive)


async def list_files(request: Request) -> Response:
    key = request.app.state.auth.client(request)
    purpose = request.query_params.get("purpose")
    now = time.time()
    files = [f for f in await request.app.state.batches.files(_owner(key))
             if (purpose is None or f.purpose == purpose) and not expired(f, now)]  # fmt: skip
    if request.query_params.get("order", "desc") == "asc":
        files.reverse()
    return json_response(_page(request, files, lambda f: f.id, lambda f: f.as_openai(), default_limit=10000, max_limit=10000))


async def _own_file(request: Request) -> FileRecord:
    viewer = _viewer(request)
    file_id = request.path_params["file_id"]
    return _visible(await request.app.state.batches.file(file_id), viewer, "file", file_id)


def _attachment(filename: str) -> str:
    """A download's Content-Disposition for any upload's name (RFC 6266): an ASCII stand-in in
    ``filename`` (no quote, backslash or control character can end the header or start another)
    and the name itself, percent-encoded UTF-8, in ``filename*``, which browsers and curl prefer."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(filename, safe='', errors='replace')}"


async def retrieve_file(request: Request) -> Response:
    return json_response((await _own_file(request)).as_openai())


async def file_content(request: Request) -> Response:
    record = await _own_file(request)
    store = request.app.state.batches
    headers = {"Content-Disposition": _attachment(record.filename)}
    if record.batch_id is None:
        return Response(await store.content(record), media_type="application/jsonl", headers=headers)
    batch = await store.batch(record.batch_id)
    lines = batch.doc["request_counts"]["total"] if batch is not None else 0
    return StreamingResponse(_rendered(record.batch_id, store.results(record.batch_id, record.ok, lines)),
                             media_type="application/jsonl", headers=headers)  # fmt: skip


async def _rendered(batch_id: str, chunks: AsyncIterator[list[tuple[int, bytes]]]) -> AsyncIterator[bytes]:
    """A batch's kept answers as its file's lines (``frames.py``), a chunk at a time."""
    async for kept in chunks:
        yield await off_loop(sum(len(answer) for _, answer in kept), frames.render_all, batch_id, kept)


async def delete_file(request: Request) -> Response:
    record = await _own_file(request)
    await request.app.state.batches.delete_file(record)
    return json_response({"id": record.id, "object": "file", "deleted": True})


# -- batches ---------------------------------------------------------------------------------


async def create_batch(request: Request) -> Response:
    state = request.app.state
    key = state.auth.client(request)
    req: BatchRequest = validate(BatchRequest, parse_body(await read_json(request)))
    if req.metadata and any(len(k) > 64 or len(v) > 512 for k, v in req.metadata.items()):
        raise InvalidRequest("'metadata' keys have at most 64 characters, values at most 512", param="metadata",
                             code="invalid_value")  # fmt: skip
    store = state.batches
    source = await store.file(req.input_file_id)
    if source is None or source.owner != _owner(key) or expired(source, time.time()):
        raise NotFound(f"no file {req.input_file_id!r}", param="input_file_id")
    if source.purpose != "batch":
        raise InvalidRequest(f"file {source.id!r} has purpose {source.purpose!r}; a batch's input needs purpose \"batch\"",
                             param="input_file_id", code="invalid_value")  # fmt: skip
    now = int(time.time())
    doc = {"id": f"batch_{secrets.token_hex(12)}", "object": "batch", "endpoint": req.endpoint, "errors": None,
           "input_file_id": source.id, "completion_window": req.completion_window, "status": "validating",
           "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
           "expires_at": now + WINDOW_S[req.completion_window], "finalizing_at": None, "completed_at": None,
           "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
           "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": req.metadata,
           "model": None, "usage": no_usage()}  # fmt: skip
    if req.output_expires_after is not None:  # not in OpenAI's batch object, but what was asked is kept in it
        doc["output_expires_after"] = req.output_expires_after.model_dump()
    record = BatchRecord(doc["id"], _owner(key), await store.next_seq(), doc)
    await store.save_batch(record)
    state.batch_runner.look_now()
    return json_response(doc)


async def _own_batch(request: Request) -> BatchRecord:
    viewer = _viewer(request)
    batch_id = request.path_params["batch_id"]
    return _visible(await request.app.state.batches.batch(batch_id), viewer, "batch", batch_id)


async def retrieve_batch(request: Request) -> Response:
    record = await _own_batch(request)
    return json_response(batch_object(record, await request.app.state.batches.cancel_requested(record.id)))


async def cancel_batch(request: Request) -> Response:
    record = await _own_batch(request)
    store = request.app.state.batches
    if record.status in ("validating", "in_progress", "finalizing", "cancelling"):
        await store.request_cancel(record.id)
        request.app.state.batch_runner.look_now()
        record.doc["cancelling_at"] = record.doc.get("cancelling_at") or int(time.time())
        return json_response(batch_object(record, True))
    if record.status == "cancelled":
        return json_response(batch_object(record, False))
    raise InvalidRequest(f"batch {record.id!r} is {record.status}: only a batch still running can be cancelled",
                         param="batch_id", code="invalid_state")  # fmt: skip


async def list_batches(request: Request) -> Response:
    """The caller's batches; the console's are everyone's, each with its owner."""
    viewer = _viewer(request)
    store = request.app.state.batches
    batches = await store.batches(viewer)
    render = (
        (lambda b: batch_object(b, False)) if viewer is not None else (lambda b: {**batch_object(b, False), "owner": b.owner})
    )
    return json_response(_page(request, batches, lambda b: b.id, render, default_limit=20, max_limit=100))


def _page(request: Request, items: Sequence[T], ident: Callable[[T], str], render: Callable[[T], dict[str, Any]], *,
          default_limit: int, max_limit: int) -> dict[str, Any]:  # fmt: skip
    """OpenAI's cursor pages: ``after`` an id, ``limit`` items."""
    limit = query_int(request, "limit", default_limit, 1, max_limit)
    after = request.query_params.get("after")
    start = 0
    if after:
        ids = [ident(item) for item in items]
        if after not in ids:
            raise InvalidRequest(f"'after' names no item of this list (got {after!r})", param="after", code="invalid_value")
        start = ids.index(after) + 1
    page = items[start : start + limit]
    data = [render(item) for item in page]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}  # fmt: skip


routes = [
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
