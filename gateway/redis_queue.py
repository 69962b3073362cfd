"""The shared job queue: several gateway replicas, one Redis (``EMBEDQ_QUEUE=redis``).

Lists with leases in a sorted set, every state change one Lua script (``redis_scripts.py``).
Not Streams: a requeued job must go back to the *front* of its queue, a client that hangs up
must be able to withdraw a job that is still waiting, workers take only jobs whose tags they
carry, and a lease takes a batch by inputs and tokens; a consumer group gives none of these
without re-implementing them beside it.

Each job belongs to the replica whose client waits for it (its *owner*). Whichever replica a
worker posts the answer to, the answer reaches the owner: directly when that is the replica
itself, else stored on the job with its id pushed to the owner's result list ``P:r:<replica>``,
which the owner pops. A replica that dies loses only its own clients' requests: the scripts
drop jobs whose owner's ``P:alive`` key lapsed instead of computing them.

The owner also checks its waiting clients' jobs every second. A job Redis lost (a restart
without its last writes) is queued again from the owner's copy, and an answer whose
notification was lost is collected, so that a Redis restart costs time, never a request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import orjson

from gateway import redis_scripts
from gateway.queue import JobDone, JobFailed, JobQueue, JobSpec, QueueStats, QueueTimeout, QueueUnavailable, all_answered
from gateway.redis_link import DOWN, RedisLink, unless_cancelled
from worker.protocol import Job

log = logging.getLogger(__name__)
WAKE_POLL_S = 1.0  # a waiting lease looks again this often, should an event be missed
SCAN_LIMIT = 4096  # waiting jobs a lease looks at, at most
RESULT_TTL_MS = 60_000  # an answer its owner never takes is dropped after this
RESULT_BATCH = 256


@dataclass(eq=False)
class _Pending:
    """One of this replica's jobs, while its client waits."""

    job_id: str
    key: str
    spec: JobSpec
    future: asyncio.Future
    enqueued_at: float
    odd_rounds: int = 0  # consecutive checks that found it gone from Redis, or answered but not taken


class RedisQueue(JobQueue):
    def __init__(
        self, link: RedisLink, lease_ttl_s: float, max_attempts: int,
        on_expired: Callable[[bool], None] = lambda requeued: None,
        clock: Callable[[], float] = time.time,  # wall clock: lease deadlines are shared by replicas
    ):
        self._link = link
        self._redis = link.redis
        self._lease_ttl_s = lease_ttl_s
        self._max_attempts = max_attempts
        self._on_expired = on_expired
        self._clock = clock
        self._ids = itertools.count()
        self._pending: dict[str, _Pending] = {}
        self._arrived: dict[str, asyncio.Event] = {}  # per queue, set (and replaced) when jobs arrive
        self._inputs_arrived: dict[str, int] = {}  # per queue, inputs that arrived so far (events)
        self._stats: dict[str, QueueStats] = {}
        self._keys: set[str] = set()  # every queue this replica's clients used
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._closing = False
        self._stopped = False
        self._scripts = {
            name: self._redis.register_script(getattr(redis_scripts, name))
            for name in ("ENQUEUE", "LEASE", "ANSWER", "RELEASE", "WITHDRAW", "EXPIRE")
        }
        link.on_event("jobs", self._on_jobs_event)
        link.on_event("reconnected", lambda _: self._wake_all())

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._results_forever()), asyncio.create_task(self._upkeep_forever())]

    async def stop(self) -> None:
        self._stopped = True
        for task in [*self._tasks, *self._background]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)

    async def close_leases(self) -> None:
        self._closing = True
        self._wake_all()

    # -- client side -------------------------------------------------------------------------

    async def run(self, key: str, specs: list[JobSpec], timeout_s: float) -> list[JobDone]:
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [
            _Pending(f"{self._link.replica}.{next(self._ids)}", key, spec, loop.create_future(), now) for spec in specs
        ]
        for entry in entries:
            self._pending[entry.job_id] = entry
        self._keys.add(key)
        refused = False  # Redis was down: nothing to withdraw
        try:
            try:
                with _unavailable():
                    await self._enqueue(entries)
            except QueueUnavailable:
                refused = True
                raise
            async with asyncio.timeout(timeout_s):
                await all_answered([entry.future for entry in entries], loop)
        except TimeoutError:
            raise QueueTimeout(f"not answered within {timeout_s:g}s") from None
        finally:
            unanswered = [entry.job_id for entry in entries if not entry.future.done()]
            for entry in entries:
                del self._pending[entry.job_id]
                entry.future.cancel()
            if unanswered and not refused:  # not awaited: this may be a cancelled request's last breath
                self._in_background(self._withdraw(unanswered, waiting_only=False))
        return [entry.future.result() for entry in entries]

    async def _enqueue(self, entries: list[_Pending], front: bool = False) -> None:
        key = entries[0].key
        args: list = [self._link.prefix, key, self._link.replica, "1" if front else "0"]
        for entry in entries:
            spec = entry.spec
            args += [
                entry.job_id, len(spec.inputs), spec.tokens, orjson.dumps(sorted(spec.tags)) if spec.tags else "",
                orjson.dumps({"model": spec.model, "inputs": spec.inputs, "truncate": spec.truncate}),
            ]
        await self._scripts["ENQUEUE"](args=args)

    async def _withdraw(self, job_ids: list[str], waiting_only: bool) -> list[str]:
        taken = await self._scripts["WITHDRAW"](args=[self._link.prefix, "1" if waiting_only else "0", *job_ids])
        return [job_id.decode() for job_id in taken]

    # -- worker side -------------------------------------------------------------------------

    async def lease(
        self, key: str, max_items: int, wait_s: float, tags: frozenset[str] = frozenset(), fill_s: float = 0.0,
        max_tokens: int | None = None,
    ) -> list[Job]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        engine_free_at = loop.time() + fill_s  # until then, jobs wait for a full batch
        while not self._closing:
            seen = self._inputs_arrived.get(key, 0)  # taken before looking, so that no arrival is missed
            filling = loop.time() < engine_free_at
            jobs, available = await self._take(key, max_items, max_tokens, tags, max_items if filling else 1)
            if jobs:
                return jobs
            now = loop.time()
            if available and now >= engine_free_at:
                continue  # the engine is free by now: take what there is
            until = engine_free_at if available else deadline
            if now >= until:
                return []
            # Look again once enough inputs may have arrived: one, or what a full batch lacks.
            needed = max_items - available if available else 1
            await self._inputs_after(key, seen, needed, min(until - now, WAKE_POLL_S))
        return []

    async def _inputs_after(self, key: str, seen: int, needed: int, timeout_s: float) -> None:
        """Wait until ``needed`` inputs arrived on key since the count was ``seen`` (or timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._inputs_arrived.get(key, 0) - seen < needed and not self._closing:
                    event = self._arrived.get(key)
                    if event is None:
                        event = self._arrived[key] = asyncio.Event()
                    await event.wait()
        except TimeoutError:
            pass

    async def _take(
        self, key: str, max_items: int, max_tokens: int | None, tags: frozenset[str], min_inputs: int,
    ) -> tuple[list[Job], int]:
        """One lease script call: the jobs taken, and how many eligible inputs were waiting."""
        args = [
            self._link.prefix, key, int(self._clock() * 1000), int(self._lease_ttl_s * 1000), max_items,
            max_tokens or 0, min_inputs, orjson.dumps(sorted(tags)), self._max_attempts, RESULT_TTL_MS,
            uuid.uuid4().hex, self._expiry_reason(), SCAN_LIMIT,
        ]
        call = asyncio.ensure_future(self._scripts["LEASE"](args=args))
        try:
            with _unavailable():
                reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The worker hung up or left while Redis was handing it jobs: give them back.
            call.add_done_callback(self._give_back)
            raise
        requeued, failed, available = reply[:3]
        self._count_expired(requeued, failed)
        return _leased_jobs(reply), available

    def _give_back(self, call: asyncio.Future) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        for job in _leased_jobs(call.result()):
            self._in_background(self.release(job.job_id, job.lease_id))

    async def complete(self, job_id: str, lease_id: str, done: JobDone) -> bool:
        return await self.answer([(job_id, lease_id, done)]) == 1

    async def fail(self, job_id: str, lease_id: str, failed: JobFailed) -> bool:
        return await self.answer([(job_id, lease_id, failed)]) == 1

    async def answer(self, answers: list[tuple[str, str, JobDone | JobFailed]]) -> int:
        """One round trip for a worker's whole post: an ANSWER script call per job, pipelined."""
        script = self._scripts["ANSWER"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, lease_id, outcome in answers:
                # Our own client's job needs no payload in Redis: the script says so, and we deliver it here.
                payload = b"" if job_id in self._pending else _encode(outcome)
                await script(args=[self._link.prefix, job_id, lease_id, payload, RESULT_TTL_MS, self._link.replica],
                             client=pipe)
            with _unavailable():
                stored = await pipe.execute()
        for (job_id, _, outcome), result in zip(answers, stored):
            if result == 2:
                self._resolve(job_id, outcome)
        return sum(result != 0 for result in stored)

    async def is_leased(self, job_id: str, lease_id: str) -> bool:
        with _unavailable():
            state, lease = await self._redis.hmget(self._link.key("j", job_id), "st", "lease")
        return state == b"l" and lease == lease_id.encode()

    async def release(self, job_id: str, lease_id: str) -> bool:
        with _unavailable():
            outcome = await self._scripts["RELEASE"](
                args=[self._link.prefix, job_id, lease_id, self._max_attempts, RESULT_TTL_MS]
            )
        return outcome != 0

    async def abandon(self, key: str, failed: JobFailed) -> int:
        mine = [e.job_id for e in self._pending.values() if e.key == key and not e.future.done()]
        if not mine:
            return 0
        with _unavailable():
            taken = await self._withdraw(mine, waiting_only=True)
        for job_id in taken:
            self._resolve(job_id, failed)
        return len(taken)

    def stats(self) -> dict[str, QueueStats]:
        return self._stats

    # -- answers reaching this replica -------------------------------------------------------

    async def _results_forever(self) -> None:
        results = self._link.key("r", self._link.replica)
        while not self._stopped:  # redis-py may swallow the cancellation of a blocking pop
            try:
                popped = await self._link.blocking.blmpop(1, 1, results, direction="LEFT", count=RESULT_BATCH)
                if popped:
                    await self._collect([job_id.decode() for job_id in popped[1]])
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
            if payload:
                self._resolve(job_id, _decode(payload))

    def _resolve(self, job_id: str, outcome: JobDone | JobFailed) -> None:
        entry = self._pending.get(job_id)
        if entry is not None and not entry.future.done():
            entry.future.set_result(outcome)

    # -- upkeep: expiry, checks, stats ---------------------------------------------------------

    async def _upkeep_forever(self) -> None:
        period = min(1.0, self._lease_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._expire()
                await self.check_pending()
            except DOWN as exc:
                unless_cancelled()
                log.debug("queue upkeep: %s", exc)

    async def _expire(self) -> None:
        reply = await self._scripts["EXPIRE"](args=[
            self._link.prefix, int(self._clock() * 1000), self._max_attempts, RESULT_TTL_MS, self._expiry_reason(),
        ])
        self._count_expired(*reply)

    async def check_pending(self) -> None:
        """Count this replica's jobs by state, and repair what a Redis restart may have lost."""
        entries = [e for e in self._pending.values() if not e.future.done()]
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hget(self._link.key("j", entry.job_id), "st")
            states = await pipe.execute()
        lost: list[_Pending] = []
        answered: list[str] = []
        stats = {key: [0, 0, 0.0] for key in self._keys}  # depth, leased, oldest age
        now = self._clock()
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
                (lost if state is None else answered).append(entry)
        self._stats = {key: QueueStats(depth=d, leased=n, oldest_age_s=age) for key, (d, n, age) in stats.items()}
        if answered:
            await self._collect([entry.job_id for entry in answered])
        for entry in lost:
            log.warning("job %s was lost by Redis (a restart?); queued again", entry.job_id)
            await self._enqueue([entry], front=True)

    def _count_expired(self, requeued: int, failed: int) -> None:
        for _ in range(requeued):
            self._on_expired(True)
        for _ in range(failed):
            self._on_expired(False)

    def _expiry_reason(self) -> str:
        return f"expired (timeout {self._lease_ttl_s:g}s)"

    # -- small helpers -----------------------------------------------------------------------

    def _on_jobs_event(self, argument: str) -> None:
        inputs, _, key = argument.partition(" ")
        self._wake(key, int(inputs))

    def _wake(self, key: str, inputs: int) -> None:
        self._inputs_arrived[key] = self._inputs_arrived.get(key, 0) + inputs
        event = self._arrived.pop(key, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for key in list(self._arrived):
            self._wake(key, 1_000_000)  # enough for any waiting lease to look again

    def _in_background(self, work) -> None:
        if self._stopped:
            work.close()
            return
        task = asyncio.ensure_future(self._quietly(work))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(work) -> None:
        try:
            await work
        except (*DOWN, QueueUnavailable) as exc:
            log.warning("Redis call in the background failed: %s", exc)


def _leased_jobs(reply: list) -> list[Job]:
    """The jobs in a LEASE script's reply: id, lease id and job JSON per job, after three counts."""
    flat = reply[3:]
    return [
        Job(job_id=flat[i].decode(), lease_id=flat[i + 1].decode(), **orjson.loads(flat[i + 2]))
        for i in range(0, len(flat), 3)
    ]


@contextmanager
def _unavailable():
    try:
        yield
    except DOWN as exc:
        raise QueueUnavailable(f"the job queue (Redis) is unreachable: {exc}") from None


_DONE = struct.Struct("<cII")  # b"D", rows, dims; then int32 prompt tokens per row, then float32 rows


def _encode(outcome: JobDone | JobFailed) -> bytes:
    if isinstance(outcome, JobFailed):
        return b"F" + orjson.dumps({"code": outcome.code, "message": outcome.message, "input_index": outcome.input_index})
    rows, dims = outcome.vectors.shape
    tokens = np.asarray(outcome.prompt_tokens, dtype="<i4").tobytes()
    return _DONE.pack(b"D", rows, dims) + tokens + np.ascontiguousarray(outcome.vectors, dtype="<f4").tobytes()


def _decode(payload: bytes) -> JobDone | JobFailed:
    if payload[:1] == b"F":
        failure = orjson.loads(payload[1:])
        return JobFailed(failure["code"], failure["message"], failure.get("input_index"))
    _, rows, dims = _DONE.unpack_from(payload)
    tokens = np.frombuffer(payload, dtype="<i4", count=rows, offset=_DONE.size)
    vectors = np.frombuffer(payload, dtype="<f4", offset=_DONE.size + 4 * rows).reshape(rows, dims)
    return JobDone(vectors, tokens.tolist())
