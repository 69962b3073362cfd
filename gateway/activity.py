"""The last hour of the fleet's traffic, as the console shows it (``console/``).

Per model, in SLOT_S slots: what client calls came to (requests, inputs, tokens, errors, 429s and
a latency histogram); per worker, what it answered (posts, inputs); per queue, its depth and
oldest job, sampled at each flush; and per replica, its queue figures now. Each replica counts
in memory (a few dict updates per call) and adds its counts to the store every FLUSH_S: its own
memory, or with replicas Redis, where every replica adds to the same slots, so any replica reads
the whole fleet:

    P:act:<slot>   hash   "<model>\\t<field>" and "worker\\t<id>\\t<field>" -> count, and
                          "queue\\t<queue>\\t<depth|oldest_ms>\\t<replica>" -> the replica's last sample;
                          expires after WINDOW_S
    P:now          hash   replica -> its queue figures (JSON), with when they were taken
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter
from collections.abc import Callable

import orjson

from gateway.metrics import LATENCY_BUCKETS
from gateway.queue import QueueStats
from gateway.redis_link import DOWN, RedisLink, text

log = logging.getLogger(__name__)
SLOT_S = 10
WINDOW_S = 3600
FLUSH_S = 2.0
Slots = dict[int, Counter[str]]


class Activity:
    def __init__(self, link: RedisLink | None, queue_stats: Callable[[], dict[str, QueueStats]], clock=time.time):
        self._link = link
        self._queue_stats = queue_stats
        self._clock = clock
        self._pending: Slots = {}
        self._kept: Slots = {}  # without Redis: the window itself

    def call(self, model: str, status: int, seconds: float, inputs: int, tokens: int) -> None:
        """A client call ended (status 0: the client hung up)."""
        counts = self._slot()
        counts[model + "\trequests"] += 1
        if status == 429:
            counts[model + "\trejected"] += 1
        elif status >= 400 or status == 0:
            counts[model + "\terrors"] += 1
        else:
            counts[model + "\tinputs"] += inputs
            counts[model + "\ttokens"] += tokens
        counts[f"{model}\tlat{bisect.bisect_left(LATENCY_BUCKETS, seconds)}"] += 1

    def batch_line(self, model: str, ok: bool, inputs: int, tokens: int) -> None:
        """A batch's line was answered (batches/runner.py): counted apart from client calls, whose
        latency it would blur."""
        counts = self._slot()
        if ok:
            counts[model + "\tbatch_inputs"] += inputs
            counts[model + "\tbatch_tokens"] += tokens
        else:
            counts[model + "\tbatch_failed"] += 1

    def answered(self, worker_id: str, inputs: int) -> None:
        """A worker's post of answers was taken."""
        counts = self._slot()
        counts[f"worker\t{worker_id}\tposts"] += 1
        counts[f"worker\t{worker_id}\tinputs"] += inputs

    def _slot(self) -> Counter[str]:
        slot = int(self._clock() // SLOT_S)
        counts = self._pending.get(slot)
        if counts is None:
            counts = self._pending[slot] = Counter()
        return counts

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except DOWN as exc:
                log.debug("could not add activity to Redis: %s", exc)

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        stats = self._queue_stats()
        # Each queue's depth and oldest job now, sampled into this slot: a gauge, so set, not added
        # (with replicas, one field per replica; the console sums the depths, takes the oldest).
        sampled = {f"queue\t{key}\t{field}": value for key, s in stats.items()
                   for field, value in (("depth", s.depth), ("oldest_ms", int(s.oldest_age_s * 1000)))}  # fmt: skip
        slot = int(self._clock() // SLOT_S)
        if self._link is None:
            for at, counts in pending.items():
                self._kept.setdefault(at, Counter()).update(counts)
            now = self._kept.setdefault(slot, Counter())
            for field, value in sampled.items():
                now[field] = value
            oldest = self._first_slot()
            for at in [s for s in self._kept if s < oldest]:
                del self._kept[at]
            return
        figures = {key: [s.depth, s.leased, s.oldest_age_s] for key, s in stats.items()}
        replica = self._link.replica
        try:
            async with self._link.redis.pipeline(transaction=False) as pipe:
                for at, counts in pending.items():
                    name = self._link.key("act", str(at))
                    for field, n in counts.items():
                        pipe.hincrby(name, field, n)
                    pipe.expireat(name, (at + 1) * SLOT_S + WINDOW_S)
                if sampled:
                    name = self._link.key("act", str(slot))
                    pipe.hset(name, mapping={f"{field}\t{replica}": value for field, value in sampled.items()})
                    pipe.expireat(name, (slot + 1) * SLOT_S + WINDOW_S)
                pipe.hset(self._link.key("now"), replica, orjson.dumps({"at": self._clock(), "queues": figures}))
                await pipe.execute()
        except DOWN:
            for at, counts in pending.items():  # kept for the next flush
                self._pending.setdefault(at, Counter()).update(counts)
            raise

    def _first_slot(self, window_s: int = WINDOW_S) -> int:
        return int((self._clock() - window_s) // SLOT_S) + 1

    async def read(self, window_s: int = WINDOW_S) -> Slots:
        """Every slot of the last window_s (at most WINDOW_S), oldest first (empty ones too),
        with what this replica has not flushed yet."""
        first = self._first_slot(window_s)
        slots = list(range(first, first + window_s // SLOT_S))
        read: Slots = {slot: Counter() for slot in slots}
        if self._link is None:
            stored = [self._kept.get(slot, Counter()) for slot in slots]
        else:
            async with self._link.redis.pipeline(transaction=False) as pipe:
                for slot in slots:
                    pipe.hgetall(self._link.key("act", str(slot)))
                replies = await pipe.execute()
            stored = [Counter({text(k): int(v) for k, v in reply.items()}) for reply in replies]
        for slot, counts in zip(slots, stored):
            read[slot].update(counts)
            read[slot].update(self._pending.get(slot, ()))
        return read

    async def queues(self) -> dict[str, QueueStats]:
        """Each queue's figures now, summed over the replicas (each counts its own clients' jobs)."""
        if self._link is None:
            return self._queue_stats()
        name = self._link.key("now")
        entries = await self._link.redis.hgetall(name)
        summed: dict[str, QueueStats] = {}
        stale = []
        for replica, raw in entries.items():
            entry = orjson.loads(raw)
            if text(replica) == self._link.replica:
                continue  # our own, fresher below
            if entry["at"] < self._clock() - 3 * FLUSH_S - 5:
                stale.append(replica)  # a replica that stopped
                continue
            for key, (depth, leased, age) in entry["queues"].items():
                summed[key] = _plus(summed.get(key), QueueStats(depth, leased, age))
        for key, stats in self._queue_stats().items():
            summed[key] = _plus(summed.get(key), stats)
        if stale:
            await self._link.redis.hdel(name, *stale)
        return summed


def _plus(a: QueueStats | None, b: QueueStats) -> QueueStats:
    if a is None:
        return b
    return QueueStats(a.depth + b.depth, a.leased + b.leased, max(a.oldest_age_s, b.oldest_age_s))
