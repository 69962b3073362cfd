"""Usage you can bill: per key, per model, per hour, what each key's requests came to.

Every client request that names a key or reaches a model is one ``record``: requests, inputs,
prompt tokens (the tokens its client was told in ``usage.prompt_tokens``), errors by code, and
``rejected`` (429s: limits and overload). The ledger sums records in memory and adds the sums
to its store every second (and on shutdown), so a request costs no write of its own:
- ``SqliteUsage``: the key database's file (one gateway, ``EMBEDQ_KEYS_DB``);
- ``RedisUsage``: one hash per hour in Redis, shared by the replicas;
- ``MemoryUsage``: this process only (no key database, no Redis): lost on restart.
Rows older than ``usage_retention_days`` are dropped.

A stored row is (hour, key, model, source, field) -> count, ``field`` one of requests, inputs,
prompt_tokens, rejected or ``error:<code>``; ``source`` is ``api`` or ``batch``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import sqlite3
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from gateway.redis_link import DOWN, RedisLink, text

log = logging.getLogger(__name__)
ANONYMOUS = "(anonymous)"  # the key name of loopback dev mode's clients (no key name has brackets)
FLUSH_EVERY_S = 1.0
BATCH_FIELDS = ("requests", "inputs", "prompt_tokens")  # also reported apart for batch lines
HOUR_S = 3600
Row = tuple[int, str, str, str]  # hour (epoch seconds), key, model, source
Totals = dict[Row, Counter[str]]


class UsageStore:
    async def add(self, totals: Totals, batch_id: str = "") -> None:
        """Add the sums; a batch sent again under the same id (its first try's answer was lost)
        is added once."""
        raise NotImplementedError

    async def read(self, first_hour: int, last_hour: int) -> Totals:
        """Every row of the hours first_hour..last_hour (epoch seconds, inclusive)."""
        raise NotImplementedError

    async def prune(self, before_hour: int) -> None:
        """Drop the hours before before_hour."""


class MemoryUsage(UsageStore):
    def __init__(self) -> None:
        self._rows: Totals = {}

    async def add(self, totals: Totals, batch_id: str = "") -> None:
        for row, counts in totals.items():
            self._rows.setdefault(row, Counter()).update(counts)

    async def read(self, first_hour: int, last_hour: int) -> Totals:
        return {row: Counter(c) for row, c in self._rows.items() if first_hour <= row[0] <= last_hour}

    async def prune(self, before_hour: int) -> None:
        self._rows = {row: c for row, c in self._rows.items() if row[0] >= before_hour}


class SqliteUsage(UsageStore):
    """In the key database's file; each call on a thread with its own connection."""

    def __init__(self, path: str):
        self._path = path
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS usage (hour INTEGER NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,"
                " source TEXT NOT NULL, field TEXT NOT NULL, n INTEGER NOT NULL,"
                " PRIMARY KEY (hour, key, model, source, field))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10)

    async def add(self, totals: Totals, batch_id: str = "") -> None:  # a transaction here: done, or not at all
        rows = [(*row, field, n) for row, counts in totals.items() for field, n in counts.items() if n]
        await asyncio.to_thread(self._add, rows)

    def _add(self, rows: list[tuple]) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (hour, key, model, source, field) DO UPDATE SET n = n + excluded.n",
                    rows,
                )
        finally:
            db.close()

    async def read(self, first_hour: int, last_hour: int) -> Totals:
        return await asyncio.to_thread(self._read, first_hour, last_hour)

    def _read(self, first_hour: int, last_hour: int) -> Totals:
        db = self._connect()
        try:
            rows = db.execute("SELECT * FROM usage WHERE hour BETWEEN ? AND ?", (first_hour, last_hour)).fetchall()
        finally:
            db.close()
        totals: Totals = {}
        for hour, key, model, source, field, n in rows:
            totals.setdefault((hour, key, model, source), Counter())[field] += n
        return totals

    async def prune(self, before_hour: int) -> None:
        await asyncio.to_thread(self._prune, before_hour)

    def _prune(self, before_hour: int) -> None:
        db = self._connect()
        try:
            with db:
                db.execute("DELETE FROM usage WHERE hour < ?", (before_hour,))
        finally:
            db.close()


# ARGV: the batch's "sent" key, then triples: hash, field, count (no field: the hash's expiry
# time). The whole batch is added once: a batch sent again within the hour its "sent" key is kept
# (one key a second per replica while usage is recorded), its first answer lost, adds nothing.
ADD_ONCE = """
if not redis.call('SET', ARGV[1], '1', 'NX', 'EX', 3600) then return 0 end
for i = 2, #ARGV, 3 do
  if ARGV[i + 1] == '' then redis.call('EXPIREAT', ARGV[i], ARGV[i + 2])
  else redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
end
return 1
"""


class RedisUsage(UsageStore):
    """``P:usage:<hour>``: a hash of "key<TAB>model<TAB>source<TAB>field" -> count, which
    expires after the retention; every replica adds its sums with HINCRBY."""

    def __init__(self, link: RedisLink, retention_s: float):
        self._link = link
        self._retention_s = int(retention_s)
        self._add = link.redis.register_script(ADD_ONCE)

    async def add(self, totals: Totals, batch_id: str = "") -> None:
        args: list[Any] = [self._link.key("usage", "sent", batch_id)]
        for (hour, key, model, source), counts in totals.items():
            name = self._link.key("usage", str(hour))
            args += [x for field, n in counts.items() if n for x in (name, "\t".join((key, model, source, field)), n)]
            args += [name, "", hour + HOUR_S + self._retention_s]  # no field: the hash's expiry
        await self._add(args=args)

    async def read(self, first_hour: int, last_hour: int) -> Totals:
        hours = list(range(first_hour, last_hour + 1, HOUR_S))
        async with self._link.redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(self._link.key("usage", str(hour)))
            replies = await pipe.execute()
        totals: Totals = {}
        for hour, fields in zip(hours, replies):
            for name, n in fields.items():
                key, model, source, field = text(name).split("\t")
                totals.setdefault((hour, key, model, source), Counter())[field] += int(n)
        return totals


def hour_of(timestamp: float) -> int:
    return int(timestamp // HOUR_S * HOUR_S)


class UsageLedger:
    def __init__(self, store: UsageStore, retention_days: float, clock=time.time):
        self._store = store
        self._retention_s = retention_days * 86400
        self._clock = clock
        self._pending: Totals = {}
        self._unsent: tuple[str, Totals] | None = None  # a batch the store failed to take, and its id
        self._lock = asyncio.Lock()

    def record(
        self,
        key: str | None,
        model: str,
        source: str = "api",
        *,
        inputs: int = 0,
        tokens: int = 0,
        code: str | None = None,
        rejected: bool = False,
    ) -> None:
        counts = self._pending.setdefault((hour_of(self._clock()), key or ANONYMOUS, model, source), Counter())
        counts["requests"] += 1
        counts["inputs"] += inputs
        counts["prompt_tokens"] += tokens
        if rejected:
            counts["rejected"] += 1
        if code is not None:
            counts[f"error:{code}"] += 1

    async def run(self) -> None:
        pruned_at = 0.0
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush()
            if self._clock() - pruned_at > HOUR_S:
                pruned_at = self._clock()
                try:
                    await self._store.prune(hour_of(pruned_at - self._retention_s))
                except (sqlite3.Error, *DOWN) as exc:
                    log.warning("could not drop old usage: %s", exc)

    async def flush(self) -> None:
        """Add what was recorded to the store. A batch the store failed to take is sent again,
        as it was and under its id, before anything newer: if its first try did reach the store
        (its answer lost), it is not counted twice."""
        async with self._lock:
            while self._unsent is not None or self._pending:
                if self._unsent is None:
                    self._unsent, self._pending = (uuid.uuid4().hex, self._pending), {}
                batch_id, totals = self._unsent
                try:
                    await self._store.add(totals, batch_id)
                except (sqlite3.Error, *DOWN) as exc:
                    log.warning("could not store usage (kept, and sent again as it is): %s", exc)
                    return
                self._unsent = None

    async def spent(self, key: str, since: float) -> int:
        """The prompt tokens ``key`` was billed from ``since`` on (a budget's period, read again
        after a restart: ``MemoryLimiter``)."""
        return sum(int(row["prompt_tokens"]) for row in await self.report(since, self._clock() + 1, key=key))  # type: ignore[call-overload]

    async def report(
        self,
        start: float,
        end: float,
        *,
        by: str = "key",
        granularity: str = "hour",
        key: str | None = None,
        model: str | None = None,
    ) -> list[dict[str, object]]:
        """Sums over [start, end) per period (hour or day, UTC) and per key or model, oldest first.
        Only the hours kept are read: a range of a century costs what the retention holds."""
        await self.flush()
        now = self._clock()
        start, end = max(start, now - self._retention_s - HOUR_S), min(end, now + HOUR_S)
        if end <= start:
            return []
        totals = await self._store.read(hour_of(start), hour_of(end - 1))
        sums: dict[tuple[int, str], Counter[str]] = {}
        for (hour, k, m, source), counts in totals.items():
            if (key is not None and k != key) or (model is not None and m != model):
                continue
            period = hour if granularity == "hour" else hour - hour % 86400
            row = sums.setdefault((period, k if by == "key" else m), Counter())
            row.update(counts)
            if source == "batch":
                row.update({f"batch_{field}": counts[field] for field in BATCH_FIELDS})
        return [_row(period, by, name, counts) for (period, name), counts in sorted(sums.items())]


def _row(period: int, by: str, name: str, counts: Counter[str]) -> dict[str, object]:
    errors = {field.removeprefix("error:"): n for field, n in sorted(counts.items()) if field.startswith("error:")}
    return {
        "start": datetime.fromtimestamp(period, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        by: name,
        "requests": counts["requests"],
        "inputs": counts["inputs"],
        "prompt_tokens": counts["prompt_tokens"],
        "rejected": counts["rejected"],
        "errors": errors,
        **{f"batch_{field}": counts[f"batch_{field}"] for field in BATCH_FIELDS},  # the part that came from batches
    }


def as_csv(rows: list[dict[str, object]], by: str) -> str:
    """A report as CSV: what ``usage --csv`` prints and the admin API's ``format=csv`` answers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ["start", by, "requests", "inputs", "prompt_tokens", "rejected", "errors", *(f"batch_{f}" for f in BATCH_FIELDS)]
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row[c] if c != "errors" else errors_text(row["errors"]) for c in columns])
    return out.getvalue()


def errors_text(errors: Any) -> str:
    return " ".join(f"{code}={n}" for code, n in errors.items())
