"""The worker's loop: register, then lease -> embed -> post until told to stop.

The three run as a pipeline, so the engine never waits on HTTP: while one batch computes, the
next is already leased (at most one batch ahead, so idle workers still get work) and the
previous one is being posted. Each lease says how long the worker expects to need its jobs
(``pace.py``), so a worker whose engine hangs loses them to another worker within seconds.

The worker never crashes on the gateway's account: a call that fails after every retry is
logged and counted, and the loop carries on. The jobs it holds are never lost: stopped, it
finishes and posts them; cut short or with a dead engine, it gives them back; and had it
vanished, their leases would expire at the gateway and they would go to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

import httpx
import numpy as np
from pydantic import ValidationError

from contract import software_version
from contract.frames import encode_results
from contract.messages import (
    MAX_CALL_S,
    MAX_TOKEN_S,
    ErrorReport,
    Job,
    JobRef,
    JobResult,
    LeaseRequest,
    ModelCard,
    Release,
    ResultsHeader,
    WorkerHello,
)
from worker.batch import BatchOutcome, run_batch
from worker.client import GatewayClient, IdTaken, NotRegistered, describe, sleep_or_stop
from worker.config import VllmGenerator, WorkerConfig
from worker.engines import Engine
from worker.metrics import WorkerMetrics
from worker.model_files import served_prompts
from worker.pace import EnginePace
from worker.probes import probe_all

log = logging.getLogger(__name__)

# A call that failed for good: its jobs' leases expire (or the registry drops us) and they go to another worker.
GATEWAY_FAILURES = (httpx.HTTPError, ValidationError, NotRegistered)
# A prefetched batch that waited this long for the engine is checked before it runs (one HTTP
# call), so that jobs whose client left meanwhile cost no engine time; a shorter wait is not
# worth the call: the most it could waste is one batch's compute.
STALE_AFTER_S = 0.1
RETRY_PAUSE_S = 2.0  # after a call failed all its retries, before the next round
LEASE_ANSWER_TIMEOUT_S = 5.0  # how long a stopping worker waits for its in-flight lease's answer
POST_BYTES = 8 << 20  # of vectors a results post carries at most: half the gateway's default body limit
# Heartbeats per gateway TTL at least: a worker idle in a long-poll is touched by nothing else,
# and one late heartbeat must not get it dropped.
HEARTBEATS_PER_TTL = 3


def new_worker_id(service_name: str) -> str:
    return f"{service_name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, client: GatewayClient, metrics: WorkerMetrics):
        self._config = config
        self._engine = engine
        self._client = client
        self._metrics = metrics
        self.worker_id = new_worker_id(config.queue.service_name)
        self._held: dict[str, Job] = {}  # leased, not yet answered
        self._leasing = False  # a lease call is in flight
        self._heartbeat_s = config.queue.heartbeat_interval_s  # capped by the gateway's TTL once it answers
        generator = config.generator
        # vLLM's own per-step token budget bounds a lease too; None: max_num_seqs alone.
        self._lease_max_tokens = generator.max_num_batched_tokens if isinstance(generator, VllmGenerator) else None
        self._pace = EnginePace(
            self._lease_max_tokens or generator.max_num_seqs * engine.info.max_input_tokens, engine.info.call_s
        )
        self._models = _model_cards(config, engine)  # what we serve never changes: built once
        self._chunked = frozenset(name for name, model in config.queue.models.items() if model.chunk_long_inputs)

    def hello(self) -> WorkerHello:
        queue = self._config.queue
        return WorkerHello(
            worker_id=self.worker_id,
            checkpoint_name=queue.checkpoint_name,
            version=queue.version,
            tags=queue.tags,
            models=self._models,
            max_batch_items=self._config.generator.max_num_seqs,
            host=socket.gethostname()[:255],
            software=software_version(),
            engine=self._config.generator.model_dump(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set and the jobs in hand are answered. Raises EngineDead if
        the engine dies; cancelled (a drain that took too long), it gives its jobs back."""
        if not await self._register(stop):
            return
        background = [asyncio.create_task(self._heartbeat_forever(stop))]
        if self._config.monitoring.tcp_probes:
            background.append(asyncio.create_task(self._probe_forever(stop)))
        self._metrics.ready.set(1)
        log.info("worker %s serving %s", self.worker_id, ", ".join(self.hello().models))
        leased: asyncio.Queue[tuple[list[Job], float] | None] = asyncio.Queue(maxsize=1)
        computed: asyncio.Queue[BatchOutcome | None] = asyncio.Queue(maxsize=1)
        no_more_leases = asyncio.Event()
        stages = [
            asyncio.create_task(self._lease_until(no_more_leases, leased)),
            asyncio.create_task(self._compute_until_done(leased, computed)),
            asyncio.create_task(self._post_until_done(computed)),
        ]
        stopping = asyncio.create_task(self._leave_when(stop, no_more_leases, background))
        try:
            await asyncio.gather(*stages)  # each stage ends when the one before it has
        finally:
            self._metrics.ready.set(0)
            stopping.cancel()
            await self._stop_leasing(no_more_leases, background)
            await self._await_lease_answer()
            for task in stages:
                task.cancel()
            await self._give_back()
            await self._leave(draining=False)  # gone: whatever the gateway still counts as ours goes back

    async def _await_lease_answer(self) -> None:
        """Let an in-flight lease bring its answer (its jobs join those given back) rather than
        abandon it: jobs the gateway had just handed to it would wait for their lease to expire."""
        deadline = time.monotonic() + LEASE_ANSWER_TIMEOUT_S
        while self._leasing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _leave_when(self, stop: asyncio.Event, no_more_leases: asyncio.Event, background: list) -> None:
        await stop.wait()
        await self._stop_leasing(no_more_leases, background)

    async def _stop_leasing(self, no_more_leases: asyncio.Event, background: list) -> None:
        """Lease no more: draining ends our pending long-poll at the gateway, which answers it (with
        no jobs, or with jobs it had just taken: those are given back) instead of losing it; the
        jobs we hold stay ours to answer."""
        if no_more_leases.is_set():
            return
        no_more_leases.set()
        for task in background:
            task.cancel()  # a heartbeat now would register us again
        await self._leave(draining=True)

    async def _lease_until(self, no_more_leases: asyncio.Event, leased: asyncio.Queue) -> None:
        while not no_more_leases.is_set():
            jobs = await self._lease(no_more_leases)
            if not jobs:
                continue
            self._held.update((job.job_id, job) for job in jobs)
            if no_more_leases.is_set():
                break  # taken while we were leaving: given back, not computed
            await leased.put((jobs, time.monotonic()))
            await leased.join()  # until the engine starts them: at most one batch ahead
        await leased.put(None)

    async def _compute_until_done(self, leased: asyncio.Queue, computed: asyncio.Queue) -> None:
        while (batch := await leased.get()) is not None:
            jobs, leased_at = batch
            if time.monotonic() - leased_at > STALE_AFTER_S:
                jobs = await self._still_wanted(jobs)
            if not jobs:
                leased.task_done()
                continue
            # The next lease is asked for once the engine is busy with these, so that it knows how
            # long to wait (fill_s): asked sooner, it takes the next call's jobs a whole call early.
            await computed.put(await self._compute(jobs, started=leased.task_done))
        await computed.put(None)

    async def _still_wanted(self, jobs: list[Job]) -> list[Job]:
        """Drop prefetched jobs whose client left (or whose lease expired) while they waited,
        so that the engine never spends time on them."""
        try:
            live = await self._client.live(_refs(self.worker_id, jobs))
        except GATEWAY_FAILURES:
            return jobs  # cannot tell: do the work, the gateway ignores what it no longer wants
        for job in jobs:
            if job.job_id not in live:
                self._held.pop(job.job_id, None)
                self._metrics.jobs.labels("withdrawn").inc()
        return [job for job in jobs if job.job_id in live]

    async def _post_until_done(self, computed: asyncio.Queue) -> None:
        while (outcome := await computed.get()) is not None:
            await self._post(outcome)

    async def _register(self, stop: asyncio.Event) -> bool:
        """Heartbeat until the gateway answers; False if told to stop first."""
        while not stop.is_set():
            try:
                await self._heartbeat()
                return True
            except GATEWAY_FAILURES as exc:
                self._gateway_failed("register", exc)
                await sleep_or_stop(RETRY_PAUSE_S, stop)
        return False

    async def _heartbeat_forever(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(self._heartbeat_s, stop):
            try:
                await self._heartbeat()
            except GATEWAY_FAILURES as exc:
                self._gateway_failed("heartbeat", exc)

    async def _heartbeat(self) -> None:
        """Heartbeat (it registers too), at least HEARTBEATS_PER_TTL times per the gateway's TTL
        from then on, whatever the config says: a worker whose interval outlasts that TTL would
        drop out of the gateway's models between heartbeats while it waits idle for jobs."""
        try:
            reply = await self._client.heartbeat(self.hello())
        except IdTaken:
            self.worker_id = new_worker_id(self._config.queue.service_name)
            self._client.new_session()
            log.warning("our worker id was taken by another process while we were away; registering as %s", self.worker_id)
            reply = await self._client.heartbeat(self.hello())
        interval = min(self._config.queue.heartbeat_interval_s, reply.worker_ttl_s / HEARTBEATS_PER_TTL)
        if interval != self._heartbeat_s and interval < self._config.queue.heartbeat_interval_s:
            log.warning(
                "heartbeating every %.3gs, not the configured %.3gs: the gateway drops a worker silent for %.3gs",
                interval,
                self._config.queue.heartbeat_interval_s,
                reply.worker_ttl_s,
            )
        self._heartbeat_s = interval

    async def _probe_forever(self, stop: asyncio.Event) -> None:
        while True:
            await probe_all(self._config.monitoring.tcp_probes, self._metrics.tcp_probe_up)
            if await sleep_or_stop(self._heartbeat_s, stop):
                return

    async def _lease(self, stop: asyncio.Event) -> list[Job]:
        fit = self._pace.fit()
        request = LeaseRequest(
            worker_id=self.worker_id,
            max_items=self._config.generator.max_num_seqs,
            wait_s=self._config.queue.lease_wait_s,
            fill_s=self._pace.fill_s(),
            max_tokens=self._lease_max_tokens,
            hold_s=self._pace.hold_s(),
            call_s=min(fit[0], MAX_CALL_S) if fit else None,  # the contract's bounds: a wild measure is not fatal
            token_s=min(fit[1], MAX_TOKEN_S) if fit else None,
        )
        self._leasing = True
        try:
            jobs = await self._client.lease(request, stop)
        except NotRegistered:
            log.warning("the gateway does not know this worker (did it restart?); registering again")
            await self._register(stop)
            return []
        except GATEWAY_FAILURES as exc:
            self._gateway_failed("lease", exc)
            await sleep_or_stop(RETRY_PAUSE_S, stop)
            return []
        finally:
            self._leasing = False
        self._metrics.leases.labels("jobs" if jobs else "empty").inc()
        return jobs

    async def _compute(self, jobs: list[Job], started: Callable[[], None] = lambda: None) -> BatchOutcome:
        # Paced in the gateway's estimated tokens, which it sizes calls by (a gateway of protocol 2
        # sends none: the engine's own count then).
        estimated = sum(job.tokens for job in jobs)
        self._pace.started(estimated)
        started()
        try:
            outcome = await asyncio.to_thread(run_batch, self._engine, jobs, self._chunked)  # EngineDead: run() gives them back
        except BaseException:
            self._pace.finished(0)
            raise
        took = self._pace.finished(estimated if estimated and outcome.engine_inputs else outcome.engine_tokens)
        self._metrics.engine_seconds.observe(took)
        if outcome.engine_inputs:
            self._metrics.batch_size.observe(outcome.engine_inputs)
            self._metrics.inputs.inc(outcome.engine_inputs)
            self._metrics.tokens.inc(outcome.engine_tokens)
        self._metrics.jobs.labels("ok").inc(len(outcome.results))
        for error in outcome.errors:
            self._metrics.jobs.labels(error.code).inc()
        return outcome

    async def _post(self, outcome: BatchOutcome) -> None:
        try:
            for results, matrices in posts(outcome):
                header = ResultsHeader(worker_id=self.worker_id, results=results)
                reply = await self._client.post_results(encode_results(header, matrices))
                self._metrics.stale_posts.inc(reply.ignored)
            if outcome.errors:
                reply = await self._client.post_errors(ErrorReport(worker_id=self.worker_id, errors=outcome.errors))
                self._metrics.stale_posts.inc(reply.ignored)
        except GATEWAY_FAILURES as exc:
            self._gateway_failed("post", exc)  # the leases expire and the jobs go to another worker
        for job_id in [r.job_id for r in outcome.results] + [e.job_id for e in outcome.errors]:
            self._held.pop(job_id, None)

    async def _give_back(self) -> None:
        if not self._held:
            return
        jobs, self._held = list(self._held.values()), {}
        log.warning("giving back %d unfinished jobs", len(jobs))
        try:
            await asyncio.wait_for(self._client.release(_refs(self.worker_id, jobs)), timeout=5.0)
        except (TimeoutError, *GATEWAY_FAILURES):
            pass  # their leases expire instead

    async def _leave(self, draining: bool) -> None:
        try:
            await asyncio.wait_for(self._client.leave(self.worker_id, draining), timeout=2.0)
        except (TimeoutError, *GATEWAY_FAILURES):
            pass  # the gateway drops us when our heartbeats stop anyway

    def _gateway_failed(self, call: str, exc: BaseException) -> None:
        self._metrics.gateway_errors.inc()
        log.warning("gateway %s failed: %s", call, describe(exc))


def _model_cards(config: WorkerConfig, engine: Engine) -> dict[str, ModelCard]:
    """The models of [queue.models], as the gateway is told of them: an embedding model's (those
    not turned off), or a cross-encoder's, which scores pairs."""
    info, cards = engine.info, {}
    model_path = config.generator.model_path if isinstance(config.generator, VllmGenerator) else None
    for name, model in config.queue.models.items():
        if info.task == "embed" and model.embedding_task.supported is False:
            continue
        too_big = [d for d in model.matryoshka_dimensions if d >= info.dimensions]
        if too_big:
            log.warning("queue.models.%s.matryoshka_dimensions: %s not below the model's %d dimensions; ignored",
                        name, too_big, info.dimensions)  # fmt: skip
        prompts = served_prompts(model_path, model.prompts, model.default_prompt)  # the model's own, then the entry's
        cards[name] = ModelCard(
            description=model.description,
            max_input_tokens=info.max_input_tokens,
            dimensions=info.dimensions,
            matryoshka_dimensions=[d for d in model.matryoshka_dimensions if d not in too_big],
            truncate=model.truncate,
            tasks=[info.task, "tokenize"],
            chunked=model.chunk_long_inputs,
            prompts=prompts.prompts,
            default_prompt=prompts.default,
            normalized=info.normalized,
        )
    return cards


def posts(outcome: BatchOutcome) -> list[tuple[list[JobResult], list[np.ndarray]]]:
    """The outcome's answers in posts of at most POST_BYTES of vectors (but a job each at least):
    a SPLADE model's are 122 KB an input, and a full engine call of them would exceed the body
    a gateway takes."""
    pieces: list[tuple[list[JobResult], list[np.ndarray]]] = []
    size = 0
    for result, matrix in zip(outcome.results, outcome.matrices):
        if not pieces or (size and size + matrix.size * 4 > POST_BYTES):
            pieces.append(([], []))
            size = 0
        pieces[-1][0].append(result)
        pieces[-1][1].append(matrix)
        size += matrix.size * 4
    return pieces


def _refs(worker_id: str, jobs: list[Job]) -> Release:
    return Release(worker_id=worker_id, jobs=[JobRef(job_id=j.job_id, lease_id=j.lease_id) for j in jobs])
