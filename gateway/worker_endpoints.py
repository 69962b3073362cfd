"""The worker endpoints (``/internal/v1/...``; the contract is the ``contract`` package).

Guarded by the worker tokens of the gateway's settings (see auth.py); with none configured, any
caller but a client key holder is accepted, which the settings allow only on loopback unless
explicitly told otherwise. Beyond the token, a worker is who it registered as only with the
session secret it registered with (``SESSION_HEADER``, on every call); and its answers are
checked against their jobs before any client sees them (queue/core.py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contract.frames import FrameError, decode_results
from contract.messages import (
    MAX_HELLO_BYTES,
    PREFIX,
    PROTOCOL_VERSION,
    RESULTS_CONTENT_TYPE,
    SESSION_HEADER,
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
from gateway.http import json_response, read_body, read_json, unless_disconnected
from gateway.queue import Answer, Expect, JobDone, JobFailed
from gateway.registry import UnknownWorker

log = logging.getLogger(__name__)
SIT_OUT_POLL_S = 1.0  # a stuck or faulty worker's lease call waits this long, then answers no jobs
# Fields a worker of protocol 2 does not know (its models forbid them): left out of what it is sent.
_NEWER_THAN_2 = {"reply": {"protocol"}, "job": {"priority", "tokens"}}


async def _read(request: Request, model: type[BaseModel], limit: int | None = None) -> Any:
    request.app.state.auth.worker(request)
    body = await read_json(request, limit=limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidRequest(f"not a valid {model.__name__}: {where}: {error['msg']}") from None


def _session(request: Request) -> str:
    """The SHA-256 of the caller's session secret (never the secret itself: it is kept nowhere)."""
    secret = request.headers.get(SESSION_HEADER, "")
    if not 16 <= len(secret) <= 256:
        raise InvalidRequest(f"worker calls carry a session secret of 16 to 256 characters in {SESSION_HEADER}")
    return hashlib.sha256(secret.encode()).hexdigest()


async def _touch(request: Request, worker_id: str) -> WorkerHello:
    """The registered worker, if the caller is it (its session secret)."""
    try:
        return await request.app.state.workers.touch(worker_id, _session(request))
    except UnknownWorker:
        raise Conflict(f"worker {worker_id!r} is not registered; send a heartbeat first", code="worker_unknown") from None


async def heartbeat(request: Request) -> Response:
    hello: WorkerHello = await _read(request, WorkerHello, limit=MAX_HELLO_BYTES)
    state = request.app.state
    await state.workers.heartbeat(hello, _session(request))
    protocol: Literal[2, 3] = 3 if hello.protocol >= 3 and PROTOCOL_VERSION >= 3 else 2
    reply = HeartbeatReply(worker_ttl_s=state.settings.worker_ttl_s, lease_ttl_s=state.settings.lease_ttl_s, protocol=protocol)
    return json_response(reply.model_dump(exclude=_NEWER_THAN_2["reply"] if protocol < 3 else None))


async def leave(request: Request) -> Response:
    bye: WorkerBye = await _read(request, WorkerBye)
    await _touch(request, bye.worker_id)
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
    if state.workers.state(req.worker_id) in ("stuck", "faulty"):
        leasing = _nothing_after(min(req.wait_s, SIT_OUT_POLL_S))  # out of rotation: no jobs for it
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
            pace=(req.call_s, req.token_s) if req.call_s is not None and req.token_s is not None else None,
        )
    # A worker that hangs up mid-poll must not be handed jobs it will never see; one that leaves
    # gets its answer at once.
    give_back = functools.partial(state.queue.release_soon, req.worker_id)
    jobs = await unless_disconnected(request, _unless_leaving(leasing, leaving, give_back))
    if hello.protocol < 3:
        return json_response(LeaseReply(jobs=jobs).model_dump_json(exclude={"jobs": {"__all__": _NEWER_THAN_2["job"]}}).encode())
    return json_response(LeaseReply(jobs=jobs).model_dump_json().encode())


async def _nothing_after(seconds: float) -> list[Job]:
    await asyncio.sleep(seconds)
    return []


async def _unless_leaving(
    leasing: Awaitable[list[Job]], leaving: asyncio.Event, give_back: Callable[[list[tuple[str, str]]], None]
) -> list[Job]:
    """The lease, or no jobs as soon as the worker says it is leaving: a stopping worker waits
    for this answer rather than hang up on it, so no job is ever handed to a closed connection.
    A worker that hangs up (this is cancelled) takes nothing: the lease still waiting is
    cancelled (``asyncio.wait`` would leave it running, to take jobs for nobody), and what it took
    just then goes back at once."""
    lease = asyncio.ensure_future(leasing)
    left = asyncio.ensure_future(leaving.wait())
    try:
        await asyncio.wait({lease, left}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        if lease.done() and not lease.cancelled() and lease.exception() is None:
            give_back([(job.job_id, job.lease_id) for job in lease.result()])
        raise
    finally:
        left.cancel()
        taken = lease.done()
        lease.cancel()  # still waiting for jobs: nothing was taken
    return lease.result() if taken else []


async def results(request: Request) -> Response:
    request.app.state.auth.worker(request)
    if request.headers.get("content-type") != RESULTS_CONTENT_TYPE:
        raise UnsupportedMediaType(f"results must be posted as {RESULTS_CONTENT_TYPE}")
    frame = await read_body(request)
    try:
        header, matrices = decode_results(frame)
    except (FrameError, ValidationError) as exc:
        raise InvalidRequest(f"bad results frame: {exc}") from None
    answers: list[Answer] = [
        (r.job_id, r.lease_id, JobDone(m, r.prompt_tokens, r.token_ids, r.texts)) for r, m in zip(header.results, matrices)
    ]
    response = await _answered(request, header.worker_id, answers)
    request.app.state.activity.answered(header.worker_id, sum(len(m) for m in matrices))
    return response


async def errors(request: Request) -> Response:
    report: ErrorReport = await _read(request, ErrorReport)
    answers: list[Answer] = [(e.job_id, e.lease_id, JobFailed(e.code, e.message, e.input_index)) for e in report.errors]
    return await _answered(request, report.worker_id, answers)


async def _answered(request: Request, worker_id: str, answers: list[Answer]) -> Response:
    state = request.app.state
    hello = await _touch(request, worker_id)
    settled = await state.queue.answer(worker_id, answers, _expect(hello))
    if settled.refused:
        problems = sorted(set(settled.refused.values()))
        log.warning("refused %d answers from worker %s: %s", len(settled.refused), worker_id, "; ".join(problems))
        for job_problem in settled.refused.values():
            state.metrics.refused(worker_id, job_problem.partition(" (")[0])
    await state.workers.note_post(worker_id, refused=bool(settled.refused))
    state.metrics.worker_posts.labels("accepted").inc(settled.accepted)
    state.metrics.worker_posts.labels("ignored").inc(settled.stale)
    state.metrics.worker_posts.labels("refused").inc(len(settled.refused))
    reply = PostReply(accepted=settled.accepted, ignored=settled.stale + len(settled.refused))
    return json_response(reply.model_dump())


def _expect(hello: WorkerHello) -> Expect:
    """What any answer of this worker must respect: its models share one engine, so one context,
    but an over-long input of a model that chunks counts more tokens than that, and answers carry
    no model name to tell them apart: no bound if any of its models chunks."""
    cards = hello.models.values()
    return Expect(None if any(card.chunked for card in cards) else max(card.max_input_tokens for card in cards))


async def release(request: Request) -> Response:
    report: Release = await _read(request, Release)
    await _touch(request, report.worker_id)
    accepted = await request.app.state.queue.release(report.worker_id, [(j.job_id, j.lease_id) for j in report.jobs])
    log.info("worker %s gave back %d jobs", report.worker_id, accepted)
    return json_response(PostReply(accepted=accepted, ignored=len(report.jobs) - accepted).model_dump())


async def check_leases(request: Request) -> Response:
    asked: Release = await _read(request, Release)
    await _touch(request, asked.worker_id)
    queue = request.app.state.queue
    live = [j.job_id for j in asked.jobs if await queue.is_leased(j.job_id, j.lease_id)]
    return json_response(LiveJobs(job_ids=live).model_dump())


routes = [
    Route(PREFIX + "/workers/heartbeat", heartbeat, methods=["POST"]),
    Route(PREFIX + "/workers/leave", leave, methods=["POST"]),
    Route(PREFIX + "/lease", lease, methods=["POST"]),
    Route(PREFIX + "/results", results, methods=["POST"]),
    Route(PREFIX + "/errors", errors, methods=["POST"]),
    Route(PREFIX + "/release", release, methods=["POST"]),
    Route(PREFIX + "/leases/check", check_leases, methods=["POST"]),
]
