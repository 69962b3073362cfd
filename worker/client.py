"""HTTP to the gateway: the one place where the worker retries (tenacity).

Transport errors, 5xx and 429 are retried with exponential backoff and jitter, up to
``[queue] http_request_retries`` times; anything else is an answer and is raised as is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
    wait_random,
)

from contract.messages import (
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
from worker.metrics import WorkerMetrics
from worker.transport import AiohttpTransport

log = logging.getLogger(__name__)
# 0.2 s, 0.4 s, 0.8 s ... up to 10 s, plus up to 1 s of jitter so that workers cut off together
# do not come back together (tenacity's wait_exponential_jitter, spelt the same on every version).
BACKOFF = wait_exponential(multiplier=0.2, max=10.0) + wait_random(0, 1)
# What a gateway of protocol 2 does not know of a model (it refuses a field it does not know).
PROTOCOL_3_CARD: Any = {"models": {"__all__": {"normalized", "default_prompt"}}}


class NotRegistered(Exception):
    """The gateway does not take this call from us as we are: register again."""


class UnknownWorker(NotRegistered):
    """The gateway does not know this worker (it restarted, or dropped us): register again."""


class IdTaken(NotRegistered):
    """Our worker id is registered by another process (ours lapsed, and it took it): pick another."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status >= 500 or status == 429
    return False


class GatewayClient:
    def __init__(
        self,
        url: str,
        token: str,
        retries: int,
        timeout_s: float,
        metrics: WorkerMetrics,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: the gateway app in process
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=url + PREFIX, headers=headers, timeout=timeout_s, transport=transport or AiohttpTransport()
        )
        self.new_session()
        self._timeout_s = timeout_s
        self._retries = retries
        self._metrics = metrics
        self.protocol = PROTOCOL_VERSION  # the gateway's, once a heartbeat has told it

    def new_session(self) -> None:
        """Who we are, beyond the token any worker may hold: the gateway binds it to our worker id."""
        self._http.headers[SESSION_HEADER] = secrets.token_hex(16)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def heartbeat(self, hello: WorkerHello) -> HeartbeatReply:
        """Register (again) in our protocol; a gateway of the previous one refuses that hello, and
        is spoken to in its own (an upgrade in progress). Every heartbeat offers ours first, so a
        worker speaks it once its gateway does."""
        try:
            response = await self._post(
                "/workers/heartbeat", json=hello.model_copy(update={"protocol": PROTOCOL_VERSION}).model_dump()
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 400 or b"protocol" not in exc.response.content:
                raise
            if self.protocol != 2:
                log.warning("the gateway speaks an older protocol (2); speaking it until it is upgraded")
            old = hello.model_copy(update={"protocol": 2}).model_dump(exclude=PROTOCOL_3_CARD)
            response = await self._post("/workers/heartbeat", json=old)
        reply = HeartbeatReply.model_validate_json(response.content)
        self.protocol = reply.protocol
        return reply

    async def leave(self, worker_id: str, draining: bool = False) -> None:
        await self._post("/workers/leave", json=WorkerBye(worker_id=worker_id, draining=draining).model_dump())

    async def lease(self, request: LeaseRequest, stopping: asyncio.Event | None = None) -> list[Job]:
        """Jobs for us; once ``stopping`` is set, a failed lease is not retried (it could only
        take jobs to give back), so a worker whose gateway went away too stops at once."""
        # The gateway holds the request up to wait_s; the timeout must outlast that.
        body = request.model_dump(exclude={"call_s", "token_s"} if self.protocol < 3 else None)
        response = await self._post("/lease", json=body, timeout=request.wait_s + self._timeout_s, stopping=stopping)
        return LeaseReply.model_validate_json(response.content).jobs

    async def post_results(self, frame: bytes) -> PostReply:
        response = await self._post("/results", content=frame, headers={"Content-Type": RESULTS_CONTENT_TYPE})
        return PostReply.model_validate_json(response.content)

    async def post_errors(self, report: ErrorReport) -> PostReply:
        response = await self._post("/errors", json=report.model_dump())
        return PostReply.model_validate_json(response.content)

    async def release(self, release: Release) -> PostReply:
        response = await self._post("/release", json=release.model_dump())
        return PostReply.model_validate_json(response.content)

    async def live(self, asked: Release) -> set[str]:
        response = await self._post("/leases/check", json=asked.model_dump())
        return set(LiveJobs.model_validate_json(response.content).job_ids)

    async def _post(
        self, path: str, timeout: float | None = None, stopping: asyncio.Event | None = None, **kwargs
    ) -> httpx.Response:
        stop: Any = stop_after_attempt(self._retries + 1)  # tenacity's stops combine by |
        sleep: Any = asyncio.sleep
        if stopping is not None:  # no retry once set, and a backoff in progress ends at once
            stop = stop | stop_when_event_set(stopping)  # type: ignore[arg-type]  # any object with is_set()
            sleep = functools.partial(sleep_or_stop, stop=stopping)
        retrying = AsyncRetrying(
            stop=stop,
            sleep=sleep,
            wait=BACKOFF,
            retry=retry_if_exception(_retryable),
            before_sleep=self._before_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                response = await self._http.post(path, timeout=timeout or self._timeout_s, **kwargs)
                if response.status_code == 409 and b"worker_unknown" in response.content:
                    raise UnknownWorker(response.text)
                if response.status_code == 403 and b"worker_session" in response.content:
                    raise IdTaken(response.text)
                response.raise_for_status()
        return response

    def _before_retry(self, state) -> None:
        self._metrics.http_retries.inc()
        exc = state.outcome.exception()
        log.warning("gateway call failed (%s); retry %d of %d", describe(exc), state.attempt_number, self._retries)


async def sleep_or_stop(seconds: float, stop: asyncio.Event) -> bool:
    """Sleep, waking early on stop; True if stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


def describe(exc: BaseException | None) -> str:
    """A failed gateway call in one line: the status and the gateway's own message, if any."""
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            message = exc.response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.response.reason_phrase
        return f"HTTP {exc.response.status_code}: {message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
