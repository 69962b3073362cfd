"""The queue's store in Redis, shared by gateway replicas (``EMBEDQ_QUEUE=redis``): sorted sets
and hashes, every state change one Lua script (``redis_scripts.py``).

Not Streams: a requeued job must go back to the *front* of its line, a client that hangs up
must be able to withdraw a job that is still waiting, workers take only jobs whose tags they
carry, a lease takes a batch by inputs and tokens, and the line is a fair order over tenants;
a consumer group gives none of these without re-implementing them beside it.

Each job belongs to the replica whose client waits for it (its *owner*). Whichever replica a
worker posts the answer to, the answer reaches the owner: directly when that is the replica
itself, else stored on the job with its id pushed to the owner's result list ``P:r:<replica>``,
which the owner pops. A replica that dies loses only its own clients' requests: the scripts
drop jobs whose owner's ``P:alive`` key lapsed instead of computing them.

The owner also checks its waiting clients' jobs every second (``upkeep``). A job Redis lost (a
restart without its last writes) is queued again from the owner's copy, and an answer whose
notification was lost is collected, so that a Redis restart costs time, never a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import orjson

from contract.frames import decode_results, encode_results
from contract.messages import Job, JobResult, ResultsHeader
from gateway.loops import Loops
from gateway.queue.jobs import CLASSES, Answer, JobDone, JobFailed, Outcome, Pending, QueueStats, QueueUnavailable
from gateway.queue.redis_scripts import ANSWER, ENQUEUE, EXPIRE, GIVE_BACK, LEASE, RELEASE_WORKER, WITHDRAW
from gateway.queue.store import Ask, Reason, Reclaimed, Store, Taken, Verdict, answer_shape
from gateway.redis_link import DOWN, RedisLink, text, unless_cancelled

log = logging.getLogger(__name__)
SCAN_LIMIT = 4096  # waiting jobs a lease looks at, at most
RESULT_TTL_MS = 60_000  # an answer its owner never takes is dropped after this
RESULT_BATCH = 256


class RedisStore(Store):
    def __init__(self, link: RedisLink):  # leases are timed by Redis's clock (the scripts' now_ms), shared by replicas
        self._link = link
        self._redis = link.redis
        self._stats: dict[str, QueueStats] = {}
        self._keys: set[str] = set()  # every queue this replica's clients used
        self._reader: asyncio.Task | None = None
        self._stopped = False
        scripts = {
            "ENQUEUE": ENQUEUE,
            "LEASE": LEASE,
            "ANSWER": ANSWER,
            "GIVE_BACK": GIVE_BACK,
            "RELEASE_WORKER": RELEASE_WORKER,
            "EXPIRE": EXPIRE,
            "WITHDRAW": WITHDRAW,
        }
        self._scripts = {name: self._redis.register_script(text) for name, text in scripts.items()}
        link.on_event("jobs", self._on_jobs_event)
        link.on_event("class", self._on_class_event)
        link.on_event("reconnected", lambda _: self._wake_all())

    async def start(self, loops: Loops) -> None:
        self._reader = loops.keep("queue results", self._results_forever)

    async def stop(self) -> None:
        self._stopped = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def put(self, jobs: list[Pending], front: bool = False) -> None:
        self._keys.add(jobs[0].key)
        args: list[Any] = [self._link.prefix, jobs[0].key, self._link.replica, "1" if front else "0"]
        for job in jobs:
            spec, placement = job.spec, job.placement
            args += [
                job.job_id,
                len(spec.inputs),
                spec.tokens,
                orjson.dumps(sorted(spec.tags)) if spec.tags else "",
                orjson.dumps(spec.job_fields(placement.priority)),
                placement.priority,
                placement.tenant,
                placement.weight,
                spec.shape,
            ]
        with _unavailable():
            await self._scripts["ENQUEUE"](args=args)
        self.core.arrived(jobs[0].key, jobs[0].placement.priority)  # at once; other replicas learn it from the event

    async def take(self, key: str, ask: Ask) -> Taken:
        args: list[Any] = [
            self._link.prefix,
            key,
            0,
            int(ask.hold_s * 1000),
            ask.max_items,
            ask.max_tokens or 0,
            ask.min_inputs,
            orjson.dumps(sorted(ask.tags)),
            uuid.uuid4().hex,
            ask.worker_id,
            SCAN_LIMIT,
            len(CLASSES),
            *(budget or 0 for budget in ask.budgets),
        ]
        call = asyncio.ensure_future(self._scripts["LEASE"](args=args))
        try:
            with _unavailable():
                reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The worker hung up or left while Redis was handing it jobs: give them back.
            call.add_done_callback(lambda done: self._give_back_taken(done, ask.worker_id))
            raise
        return Taken(_leased_jobs(reply), reply[0])

    def _give_back_taken(self, call: asyncio.Future, worker_id: str) -> None:
        if call.cancelled() or call.exception() is not None or self._stopped:
            return
        refs = [(job.job_id, job.lease_id) for job in _leased_jobs(call.result())]
        if refs:
            task = asyncio.ensure_future(self.give_back(worker_id, refs))
            task.add_done_callback(_best_effort)

    async def settle(self, worker_id: str, answers: list[Answer], refused: set[str]) -> list[Verdict]:
        """One round trip for a worker's whole post: an ANSWER script call per job, pipelined."""
        script = self._scripts["ANSWER"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, lease_id, outcome in answers:
                wrong = job_id in refused
                # Our own client's job needs no payload in Redis: the script says so, and we deliver it here.
                payload = b"" if wrong or job_id in self.core.pending else _encode(job_id, lease_id, worker_id, outcome)
                kind, count = _shape(outcome)
                args: list[Any] = [self._link.prefix, job_id, lease_id, payload, RESULT_TTL_MS, self._link.replica, worker_id,
                        "1" if wrong else "0", kind, count, self.max_attempts, _shape_of(outcome)]  # fmt: skip
                await script(args=args, client=pipe)
            with _unavailable():
                stored = await pipe.execute()
        for (job_id, _, outcome), result in zip(answers, stored):
            if result == 2:
                self.core.resolve(job_id, outcome)
        return [Verdict.REFUSED if r == 3 else Verdict.STALE if r == 0 else Verdict.ACCEPTED for r in stored]

    async def give_back(self, worker_id: str, refs: list[tuple[str, str]]) -> int:
        script = self._scripts["GIVE_BACK"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, lease_id in refs:
                await script(args=[self._link.prefix, job_id, lease_id, self.max_attempts, RESULT_TTL_MS, worker_id], client=pipe)
            with _unavailable():
                outcomes = await pipe.execute()
        return sum(outcome != 0 for outcome in outcomes)

    async def release_worker(self, worker_id: str) -> Reclaimed:
        with _unavailable():
            requeued, failed = await self._scripts["RELEASE_WORKER"](
                args=[self._link.prefix, worker_id, self.max_attempts, RESULT_TTL_MS]
            )
        return Reclaimed(requeued, failed)

    async def expire(self) -> Reclaimed:
        with _unavailable():
            reply = await self._scripts["EXPIRE"](args=[self._link.prefix, 0, self.max_attempts, RESULT_TTL_MS])
        return Reclaimed(reply[0], reply[1], {text(worker) for worker in reply[2:]})

    async def withdraw(self, job_ids: list[str], waiting_only: bool) -> list[str]:
        with _unavailable():
            taken = await self._scripts["WITHDRAW"](args=[self._link.prefix, "1" if waiting_only else "0", *job_ids])
        return [text(job_id) for job_id in taken]

    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        with _unavailable():
            state, lease = await self._redis.hmget(self._link.key("j", job_id), "st", "lease")
        return state == b"l" and lease == lease_id.encode()

    async def held(self, worker_ids: list[str]) -> dict[str, int]:
        with _unavailable():
            async with self._redis.pipeline(transaction=False) as pipe:
                for worker_id in worker_ids:
                    pipe.scard(self._link.key("wl", worker_id))
                counts = await pipe.execute()
        return dict(zip(worker_ids, counts))

    def stats(self) -> dict[str, QueueStats]:
        return self._stats

    # -- answers reaching this replica -------------------------------------------------------

    async def _results_forever(self) -> None:
        results = self._link.key("r", self._link.replica)
        while not self._stopped:  # redis-py may swallow the cancellation of a blocking pop
            try:
                popped = await self._link.blocking.blmpop(1, 1, results, direction="LEFT", count=RESULT_BATCH)
                if popped:
                    await self._collect([text(job_id) for job_id in popped[1]])  # type: ignore[arg-type]  # ids, not counts
            except DOWN as exc:
                unless_cancelled()
                log.debug("result reader: %s", exc)
                await asyncio.sleep(0.5)

    async def _collect(self, job_ids: list[str]) -> None:
        """Take the stored answers of these jobs out of Redis and hand them to their clients."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                pipe.hget(self._link.key("j", job_id), "res")
                pipe.delete(self._link.key("j", job_id))
            replies = await pipe.execute()
        for job_id, payload in zip(job_ids, replies[::2]):
            if not payload:
                continue
            if payload[:1] == b"X":
                attempts, _, reason = payload[1:].decode().partition(" ")
                self.core.exhausted(job_id, int(attempts), cast(Reason, reason))  # written by our scripts
            else:
                self.core.resolve(job_id, _decode(payload))

    # -- upkeep: checks, stats ---------------------------------------------------------------

    async def upkeep(self) -> None:
        """Count this replica's jobs by state, and repair what a Redis restart may have lost."""
        with _unavailable():
            await self._check_pending()

    async def _check_pending(self) -> None:
        entries = [e for e in self.core.pending.values() if not e.future.done()]
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hget(self._link.key("j", entry.job_id), "st")
            states = await pipe.execute()
        lost: list[Pending] = []
        answered: list[str] = []
        stats = {key: [0, 0, 0.0] for key in self._keys}  # depth, leased, oldest age
        now = time.monotonic()
        for entry, state in zip(entries, states):
            counts = stats.setdefault(entry.key, [0, 0, 0.0])
            if state == b"w":
                counts[0] += 1
                counts[2] = max(counts[2], now - entry.enqueued_at)
            elif state == b"l":
                counts[1] += 1
            odd = state is None or state == b"d"
            entry.odd_rounds = entry.odd_rounds + 1 if odd and not entry.future.done() else 0
            if entry.odd_rounds >= 2:  # two rounds apart: no answer on its way explains it
                entry.odd_rounds = 0
                if state is None:
                    lost.append(entry)
                else:
                    answered.append(entry.job_id)
        self._stats = {key: QueueStats(depth=int(d), leased=int(n), oldest_age_s=age) for key, (d, n, age) in stats.items()}
        if answered:
            await self._collect(answered)
        for entry in lost:
            log.warning("job %s was lost by Redis (a restart?); queued again", entry.job_id)
            await self.put([entry], front=True)

    # -- arrivals ------------------------------------------------------------------------------

    def _on_jobs_event(self, argument: str) -> None:
        inputs, _, key = argument.partition(" ")
        self.core.wake(key, int(inputs))

    def _on_class_event(self, argument: str) -> None:
        priority, _, key = argument.partition(" ")
        self.core.arrived(key, int(priority))

    def _wake_all(self) -> None:
        for key in self._keys:
            self.core.wake(key, 1_000_000)  # enough for any waiting lease to look again


def _leased_jobs(reply: list) -> list[Job]:
    """The jobs in a LEASE script's reply: id, lease id and job JSON per job, after the count."""
    flat = reply[1:]
    return [
        Job.model_construct(job_id=flat[i].decode(), lease_id=flat[i + 1].decode(), **orjson.loads(flat[i + 2]))
        for i in range(0, len(flat), 3)
    ]


def _best_effort(task: asyncio.Future) -> None:
    """Collect a background give-back's outcome: if it failed, the leases expire instead."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("giving back a hung-up lease's jobs failed: %s", task.exception())


@contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except DOWN as exc:
        raise QueueUnavailable(f"the job queue (Redis) is unreachable: {exc}") from None


def _shape_of(outcome: Outcome) -> str:
    return answer_shape(outcome) if isinstance(outcome, JobDone) else ""


def _shape(outcome: Outcome) -> tuple[str, int]:
    """What the ANSWER script checks against the job (see store.fits)."""
    if isinstance(outcome, JobDone):
        return "D", outcome.vectors.shape[0]
    return "F", -1 if outcome.input_index is None else outcome.input_index


def _encode(job_id: str, lease_id: str, worker_id: str, outcome: Outcome) -> bytes:
    if isinstance(outcome, JobFailed):
        return b"F" + orjson.dumps({"code": outcome.code, "message": outcome.message, "input_index": outcome.input_index})
    rows, dims = outcome.vectors.shape
    result = JobResult(job_id=job_id, lease_id=lease_id, rows=rows, dims=dims, prompt_tokens=outcome.prompt_tokens,
                       token_ids=outcome.token_ids, texts=outcome.texts)  # fmt: skip
    return b"D" + encode_results(ResultsHeader(worker_id=worker_id, results=[result]), [outcome.vectors])


def _decode(payload: bytes) -> Outcome:
    if payload[:1] == b"F":
        failure = orjson.loads(payload[1:])
        return JobFailed(failure["code"], failure["message"], failure.get("input_index"))
    header, (vectors,) = decode_results(payload[1:])
    result = header.results[0]
    return JobDone(vectors, result.prompt_tokens, result.token_ids, result.texts)
