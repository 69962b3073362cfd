"""The worker endpoints (``/internal/v1/...``; the contract is the ``contract`` package).

Guarded by the worker tokens of the gateway's settings (see auth.py); with none configured, any
caller but a client key holder is accepted, which the settings allow only on loopback unless
explicitly told otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contract.frames import FrameError, decode_results
from contract.messages import (
    PREFIX,
    RESULTS_CONTENT_TYPE,
    ErrorReport,
    HeartbeatReply,
    Job,
    LeaseReply,
    LeaseRequest,
    LiveJobs,
    PostReply,
    Release,
    WorkerBye,
    WorkerHello,
)
from gateway.errors import Conflict, InvalidRequest, UnsupportedMediaType
from gateway.http import json_response, read_body, unless_disconnected
from gateway.queue import JobDone, JobFailed
from gateway.registry import UnknownWorker

log = logging.getLogger(__name__)
STUCK_POLL_S = 1.0  # a stuck worker's lease call waits this long, then answers no jobs


async def _read(request: Request, model: type[BaseModel]) -> Any:
    request.app.state.auth.worker(request)
    body = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(f"not a valid {model.__name__}: {exc.errors()[0]['msg']}") from None


async def _touch(request: Request, worker_id: str) -> WorkerHello:
    try:
        return await request.app.state.workers.touch(worker_id)
    except UnknownWorker:
        raise Conflict(f"worker {worker_id!r} is not registered; send a heartbeat first", code="worker_unknown") from None


async def heartbeat(request: Request) -> Response:
    hello: WorkerHello = await _read(request, WorkerHello)
    state = request.app.state
    await state.workers.heartbeat(hello)
    reply = HeartbeatReply(worker_ttl_s=state.settings.worker_ttl_s, lease_ttl_s=state.settings.lease_ttl_s)
    return json_response(reply.model_dump())


async def leave(request: Request) -> Response:
    bye: WorkerBye = await _read(request, WorkerBye)
    workers = request.app.state.workers
    if bye.draining:
        await workers.drain(bye.worker_id)
        log.info("worker %s is draining: no more jobs for it", bye.worker_id)
    else:
        await workers.leave(bye.worker_id)
        log.info("worker %s left", bye.worker_id)
    return json_response({})


async def lease(request: Request) -> Response:
    req: LeaseRequest = await _read(request, LeaseRequest)
    hello = await _touch(request, req.worker_id)
    state = request.app.state
    leaving = state.workers.leaving(req.worker_id)
    if state.workers.is_stuck(req.worker_id):
        leasing = _nothing_after(min(req.wait_s, STUCK_POLL_S))  # out of rotation: no jobs for it
    else:
        leasing = state.queue.lease(
            hello.checkpoint_name,
            req.worker_id,
            max_items=req.max_items,
            wait_s=req.wait_s,
            tags=frozenset(hello.tags),
            fill_s=req.fill_s,
            max_tokens=req.max_tokens,
            hold_s=req.hold_s,
        )
    # A worker that hangs up mid-poll must not be handed jobs it will never see; one that leaves
    # gets its answer at once.
    jobs = await unless_disconnected(request, _unless_leaving(leasing, leaving))
    return json_response(LeaseReply(jobs=jobs).model_dump_json().encode())


async def _nothing_after(seconds: float) -> list[Job]:
    await asyncio.sleep(seconds)
    return []


async def _unless_leaving(leasing: Awaitable[list[Job]], leaving: asyncio.Event) -> list[Job]:
    """The lease, or no jobs as soon as the worker says it is leaving: a stopping worker waits
    for this answer rather than hang up on it, so no job is ever handed to a closed connection."""
    lease = asyncio.ensure_future(leasing)
    left = asyncio.ensure_future(leaving.wait())
    try:
        await asyncio.wait({lease, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if lease.done():
        return lease.result()
    lease.cancel()  # still waiting for jobs: nothing was taken
    return []


async def results(request: Request) -> Response:
    request.app.state.auth.worker(request)
    if request.headers.get("content-type") != RESULTS_CONTENT_TYPE:
        raise UnsupportedMediaType(f"results must be posted as {RESULTS_CONTENT_TYPE}")
    frame = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        header, matrices = decode_results(frame)
    except (FrameError, ValidationError) as exc:
        raise InvalidRequest(f"bad results frame: {exc}") from None
    answers = [(r.job_id, r.lease_id, JobDone(m, r.prompt_tokens)) for r, m in zip(header.results, matrices)]
    accepted = await request.app.state.queue.answer(header.worker_id, answers)
    return await _posted(request, header.worker_id, accepted, len(header.results))


async def errors(request: Request) -> Response:
    report: ErrorReport = await _read(request, ErrorReport)
    answers = [(e.job_id, e.lease_id, JobFailed(e.code, e.message, e.input_index)) for e in report.errors]
    accepted = await request.app.state.queue.answer(report.worker_id, answers)
    return await _posted(request, report.worker_id, accepted, len(report.errors))


async def release(request: Request) -> Response:
    report: Release = await _read(request, Release)
    accepted = await request.app.state.queue.release(report.worker_id, [(j.job_id, j.lease_id) for j in report.jobs])
    log.info("worker %s gave back %d jobs", report.worker_id, accepted)
    return await _posted(request, report.worker_id, accepted, len(report.jobs))


async def check_leases(request: Request) -> Response:
    asked: Release = await _read(request, Release)
    queue = request.app.state.queue
    live = [j.job_id for j in asked.jobs if await queue.is_leased(j.job_id, j.lease_id)]
    return json_response(LiveJobs(job_ids=live).model_dump())


async def _posted(request: Request, worker_id: str, accepted: int, total: int) -> Response:
    state = request.app.state
    try:
        await state.workers.touch(worker_id)
    except UnknownWorker:
        pass  # the lease ids decide what counts, not the registration
    await state.workers.mark_serving(worker_id)  # it answers: whatever stalled it is over
    state.metrics.worker_posts.labels("accepted").inc(accepted)
    state.metrics.worker_posts.labels("ignored").inc(total - accepted)
    return json_response(PostReply(accepted=accepted, ignored=total - accepted).model_dump())


routes = [
    Route(PREFIX + "/workers/heartbeat", heartbeat, methods=["POST"]),
    Route(PREFIX + "/workers/leave", leave, methods=["POST"]),
    Route(PREFIX + "/lease", lease, methods=["POST"]),
    Route(PREFIX + "/results", results, methods=["POST"]),
    Route(PREFIX + "/errors", errors, methods=["POST"]),
    Route(PREFIX + "/release", release, methods=["POST"]),
    Route(PREFIX + "/leases/check", check_leases, methods=["POST"]),
]
