"""The worker registry shared by gateway replicas through Redis (``EMBEDQ_QUEUE=redis``).

Each replica keeps the view of ``local.py`` for the request path and syncs it:

    P:w:<worker>     string  the worker's WorkerHello, the SHA-256 of its session secret, the replica
                             its last heartbeat came to, and whether it drains; expiring
                             worker_ttl_s after its last call (any replica refreshes it)
    P:workers        set     worker ids, pruned of those whose record expired
    P:out:<worker>   string  present while the worker sits out: until when (wall clock), and why
    P:first_seen     hash    model -> wall-clock time a worker first served it
    P:tagsets:<m>    set     tag sets (JSON) model m was ever served with
    P:models_log     stream  the names of models added or forgotten (a JSON list an entry), for
                             LOG_KEPT_S

Every replica reloads the view every REFRESH_S, and at once when a request names a model or a
worker it does not know, so a worker registered through replica A is served by replica B
straight away. Of the models ever served it reads what changed since its last look: the log's
newer entries name them, and it reads those names' state, so a refresh costs what the live
workers and the changes cost, not what was ever served. It reads all of them only at start, and
when the log dropped entries it had not read. A model that no live worker has named for
model_ttl_s is forgotten by the replica that notices (in Redis too; any replica may, it is
idempotent); a heartbeat writes its models again each time, so one forgotten by a replica that
had not yet seen it come back is restored at once. A worker that drops out of a replica's view (its record expired, or it left) is
passed to ``on_departed`` by that replica: returning its leases is idempotent, so it does not
matter which replica does it first. A worker's draining and leaving are published, so that the
replica holding its lease long-poll answers it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import orjson
import redis
from pydantic import ValidationError

from contract.messages import PROTOCOLS, ModelCard, WorkerHello
from gateway.errors import ApiError
from gateway.loops import Loops
from gateway.queue import QueueUnavailable
from gateway.redis_link import DOWN, RedisLink, text, unless_cancelled
from gateway.registry.local import Route, State, UnknownWorker, WorkerRegistry

log = logging.getLogger(__name__)
REFRESH_S = 0.5
FORGET_CHUNK = 1000  # models forgotten per Redis round trip
LOG_KEPT_S = 60.0  # how long the models' change log keeps an entry
LOG_READ = 50  # log entries read per round trip (an entry names up to FORGET_CHUNK models)


class RedisRegistry(WorkerRegistry):
    def __init__(self, link: RedisLink, worker_ttl_s: float, stuck_s: float, model_ttl_s: float = 3600.0):
        super().__init__(worker_ttl_s, stuck_s, model_ttl_s)
        self._log_at: str | None = None  # the models_log id its models are up to; None: read them all
        self._log_read = 0  # how many entries ever added to the log that is
        self._skew_s = 0.0  # Redis's clock less this one's, as last read (log ids are Redis's time)
        self._link = link
        self._ttl_ms = int(worker_ttl_s * 1000)
        self._written: dict[str, float] = {}  # worker id -> when this replica last refreshed its record
        self._parsed: dict[str, tuple[dict, WorkerHello]] = {}  # worker id -> its hello as last read, and parsed
        self._said_unreadable: set[str] = set()  # workers whose records could not be read, told once
        self._refreshed_at = 0.0  # when the newest finished refresh started (monotonic)
        self._refreshing: asyncio.Task | None = None
        self._one_refresh = asyncio.Lock()  # the loop's and a miss's: two at once counted log entries twice
        link.on_event("leave", self._forget)
        link.on_event("drain", self._draining)

    async def start(self, loops: Loops | None = None) -> None:
        self._sweeper = (loops or Loops()).keep("registry refresh", self._refresh_forever)

    async def stop(self) -> None:
        for task in (self._sweeper, self._refreshing):
            if task is not None:
                task.cancel()

    def _record(self, hello: WorkerHello, session: str, draining: bool) -> bytes:
        record = {"hello": hello.model_dump(), "session": session, "via": self._link.replica, "draining": draining}
        return orjson.dumps({**record, "at": time.time()})

    async def heartbeat(self, hello: WorkerHello, session: str) -> None:
        if hello.worker_id not in self._workers:
            # Its claims are checked against every replica's workers, as of a refresh at most
            # REFRESH_S old (a flood of new workers costs a refresh per REFRESH_S, not one each).
            await self._refresh_on_miss(REFRESH_S)
        self.check_claims(hello, session)
        self._remember(hello, session)
        link = self._link
        async with link.redis.pipeline(transaction=False) as pipe:
            pipe.set(link.key("w", hello.worker_id), self._record(hello, session, draining=False), px=self._ttl_ms)
            pipe.sadd(link.key("workers"), hello.worker_id)
            for model in hello.models:
                pipe.hsetnx(link.key("first_seen"), model, time.time())
                pipe.sadd(link.key("tagsets", model), orjson.dumps(sorted(hello.tags)))
            added = await _or_503(pipe.execute())
        changed = [model for model, new, new_tags in zip(hello.models, added[2::2], added[3::2]) if new or new_tags]
        if changed:
            await _or_503(self._log_change(link.redis, changed))
        self._written[hello.worker_id] = time.monotonic()

    async def forget_models(self, models: list[str]) -> None:
        await super().forget_models(models)
        link = self._link
        for start in range(0, len(models), FORGET_CHUNK):
            chunk = models[start : start + FORGET_CHUNK]
            async with link.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(link.key("first_seen"), *chunk)
                pipe.delete(*(link.key("tagsets", m) for m in chunk))
                self._log_change(pipe, chunk)
                await pipe.execute()

    def _log_change(self, client: redis.asyncio.Redis, models: list[str]):
        """Tell the other replicas to read these models' state again; entries older than
        LOG_KEPT_S go (a replica behind them reads everything)."""
        return client.xadd(
            self._link.key("models_log"), {"models": orjson.dumps(models)}, minid=self._log_floor(), approximate=False
        )

    def _log_floor(self) -> str:
        return f"{int((time.time() + self._skew_s - LOG_KEPT_S) * 1000)}-0"

    async def touch(self, worker_id: str, session: str) -> WorkerHello:
        try:
            hello = await super().touch(worker_id, session)
        except UnknownWorker:
            await self._refresh_on_miss()  # it may have registered through another replica
            hello = await super().touch(worker_id, session)
        now = time.monotonic()
        if now - self._written.get(worker_id, 0.0) > self._ttl_s / 4:
            if not await _or_503(self._link.redis.pexpire(self._link.key("w", worker_id), self._ttl_ms)):
                self._forget(worker_id)  # its record expired meanwhile: it must register again
                raise UnknownWorker(worker_id)
            self._written[worker_id] = now
        return hello

    async def leave(self, worker_id: str) -> None:
        self._forget(worker_id)
        self._written.pop(worker_id, None)
        link = self._link
        async with link.redis.pipeline(transaction=False) as pipe:
            pipe.delete(link.key("w", worker_id), link.key("out", worker_id))
            pipe.srem(link.key("workers"), worker_id)
            link.event_command(pipe, "leave", worker_id)
            await _or_503(pipe.execute())
        await self.on_departed(worker_id)

    async def drain(self, worker_id: str) -> None:
        await super().drain(worker_id)
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        link = self._link
        async with link.redis.pipeline(transaction=False) as pipe:
            pipe.set(link.key("w", worker_id), self._record(worker.hello, worker.session, draining=True), xx=True, keepttl=True)
            link.event_command(pipe, "drain", worker_id)
            await _or_503(pipe.execute())

    async def _sit_out(self, worker_id: str, why: State) -> None:
        await super()._sit_out(worker_id, why)
        out = orjson.dumps({"until": time.time() + self._stuck_s, "why": why})
        await _or_503(self._link.redis.set(self._link.key("out", worker_id), out, px=int(self._stuck_s * 1000)))

    async def _back_in(self, worker_id: str) -> None:
        await super()._back_in(worker_id)
        await _or_503(self._link.redis.delete(self._link.key("out", worker_id)))

    async def resolve(self, model: str, tags: frozenset[str] = frozenset(), visible: Callable[[str], bool] = bool) -> Route:
        try:
            return await super().resolve(model, tags, visible)
        except ApiError:
            if not await self._refresh_on_miss():  # "not found" would be a guess: say what is wrong
                raise QueueUnavailable("the worker registry (Redis) is unreachable") from None
            return await super().resolve(model, tags, visible)

    async def _refresh_on_miss(self, stale_s: float = 0.0) -> bool:
        """Reload the view from Redis, by a refresh that started after this call (or at most
        ``stale_s`` before it; concurrent misses share one: a flood of unknown names costs one
        refresh at a time); False if Redis could not be reached."""
        missed_at = time.monotonic() - stale_s
        while self._refreshed_at < missed_at:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self.refresh())
            try:
                await asyncio.shield(self._refreshing)
            except DOWN as exc:
                log.debug("registry refresh: %s", exc)
                return False
        return True

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
                await self.sweep()
            except (*DOWN, QueueUnavailable) as exc:
                unless_cancelled()
                log.debug("registry refresh: %s", exc)

    async def refresh(self) -> None:
        """Replace the local view of workers and models with what Redis holds; one at a time
        (two read the same log entries and counted them twice, and the count then said the log
        had moved past this replica: a full read of every model, seconds of the event loop)."""
        async with self._one_refresh:
            await self._refresh()

    async def _refresh(self) -> None:
        link = self._link
        started, started_at = self._clock(), time.monotonic()
        ids = sorted(text(i) for i in await link.redis.smembers(link.key("workers")))
        records = await link.redis.mget([link.key("w", i) for i in ids]) if ids else []
        outs = await link.redis.mget([link.key("out", i) for i in ids]) if ids else []
        gone = [worker_id for worker_id, record in zip(ids, records) if record is None]
        if gone:
            await link.redis.srem(link.key("workers"), *gone)
        live: set[str] = set()
        for worker_id, record, out in zip(ids, records, outs):
            if record is None:
                continue
            try:
                found = orjson.loads(record)
                hello = self._hello(found["hello"])
            except (ValueError, ValidationError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
                self._unreadable(worker_id, exc)
                continue
            self._remember(hello, found["session"], own=found["via"] == link.replica, heartbeat_at=found.get("at"))
            worker = self._workers[hello.worker_id]
            sitting = orjson.loads(out) if out else None
            worker.out_until = started + sitting["until"] - time.time() if sitting else 0.0
            worker.out_why = sitting["why"] if sitting else "serving"
            if found.get("draining"):
                self._draining(hello.worker_id)
            live.add(hello.worker_id)
        for worker_id, worker in list(self._workers.items()):
            if worker_id not in live and worker.last_seen < started:
                self._forget(worker_id)  # expired or left: its record is gone
                self._departed.append(worker_id)
        self._said_unreadable.intersection_update(ids)
        for kept in (self._written, self._parsed):
            for worker_id in [w for w in kept if w not in self._workers]:
                del kept[worker_id]  # nothing kept per departed worker
        await self._load_models()
        self._refreshed_at = max(self._refreshed_at, started_at)

    def _hello(self, raw: dict) -> WorkerHello:
        """A worker's hello as its record holds it, parsed only when it changed since the last
        refresh (64 model cards take a while to check, and every refresh reads every record).
        The record may come from a newer replica, in a rolling upgrade: fields this version does
        not know are left out, and a newer protocol is read as the newest this one speaks (the
        worker's replies come from the replica it talks to, which speaks its version)."""
        worker_id = raw.get("worker_id", "")
        parsed = self._parsed.get(worker_id)
        if parsed is None or parsed[0] != raw:
            known = {k: v for k, v in raw.items() if k in WorkerHello.model_fields}
            known["models"] = {name: {k: v for k, v in card.items() if k in ModelCard.model_fields}
                               for name, card in dict(raw.get("models") or {}).items()}  # fmt: skip
            if isinstance(known.get("protocol"), int) and known["protocol"] > max(PROTOCOLS):
                known["protocol"] = max(PROTOCOLS)
            parsed = self._parsed[worker_id] = (raw, WorkerHello.model_validate(known))
        return parsed[1]

    def _unreadable(self, worker_id: str, exc: Exception) -> None:
        """A record no version of ours wrote: that worker is left out here (others still serve)."""
        if worker_id not in self._said_unreadable:
            self._said_unreadable.add(worker_id)
            log.warning("worker %s: its registration in Redis cannot be read, and is left out: %s", worker_id, exc)

    async def _load_models(self) -> None:
        """Catch up with the models' change log: every model ever served, as Redis holds it
        (live workers' models are known from their records at every refresh; this is for the
        others), so that models another replica forgot are forgotten here too."""
        if self._log_at is None:
            return await self._load_all_models()
        key = self._link.key("models_log")
        while True:
            async with self._link.redis.pipeline(transaction=True) as pipe:  # no trim between count and read
                pipe.time()
                pipe.xinfo_stream(key)
                pipe.xrange(key, min=f"({self._log_at}", count=LOG_READ)
                pipe.xtrim(key, minid=self._log_floor(), approximate=False)
                now, info, entries, _ = await pipe.execute(raise_on_error=False)
            self._skew_s = now[0] + now[1] / 1e6 - time.time()
            if _no_log(info):  # a new Redis, or one that lost its data
                return await self._load_all_models() if self._log_read else None
            if self._missed(info, self._log_at):
                log.info("the models' change log moved past this replica: reading every model again")
                return await self._load_all_models()
            if not entries:
                return
            await self._read_models(sorted({name for _, fields in entries for name in orjson.loads(fields[b"models"])}))
            self._log_at, self._log_read = text(entries[-1][0]), self._log_read + len(entries)
            if len(entries) < LOG_READ:
                return

    def _missed(self, info: dict, at: str) -> bool:
        """Whether the log dropped entries this replica has not read, or is no longer the log it
        read (Redis restarted from an older copy, or lost its data)."""
        added = info["entries-added"]
        moved_past = added - info["length"] > self._log_read
        return moved_past or added < self._log_read or _log_id(info["last-generated-id"]) < _log_id(at)

    async def _read_models(self, names: list[str]) -> None:
        client, link = self._link.redis, self._link
        first_seen = await client.hmget(link.key("first_seen"), names)
        found = [(name, seen) for name, seen in zip(names, first_seen) if seen is not None]
        async with client.pipeline(transaction=False) as pipe:
            for name, _ in found:
                pipe.smembers(link.key("tagsets", name))
            tagsets = await pipe.execute()
        gone = {name for name, seen in zip(names, first_seen) if seen is None}
        self._take_models([(name, seen, sets) for (name, seen), sets in zip(found, tagsets)], gone)

    async def _load_all_models(self) -> None:
        link, key = self._link, self._link.key("models_log")
        async with link.redis.pipeline(transaction=True) as pipe:  # first: what changes after it, it reads again
            pipe.time()
            pipe.xinfo_stream(key)
            now, info = await pipe.execute(raise_on_error=False)
        self._skew_s = now[0] + now[1] / 1e6 - time.time()
        if _no_log(info):
            info = {"last-generated-id": "0-0", "entries-added": 0}
        first_seen = await link.redis.hgetall(link.key("first_seen"))
        names = [text(model) for model in first_seen]
        async with link.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(link.key("tagsets", name))
            tagsets = await pipe.execute()
        held = set(names)
        self._take_models(list(zip(names, first_seen.values(), tagsets)), [m for m in self._ever_served if m not in held])
        self._log_at, self._log_read = text(info["last-generated-id"]), info["entries-added"]

    def _take_models(self, found: list[tuple[str, bytes | str, set]], absent: Iterable[str]) -> None:
        """Models' state as Redis holds it: when first seen and with which tag sets; those it
        holds no more (forgotten) are forgotten here, unless a live worker names them."""
        for name, seen, sets in found:
            self._first_seen[name] = float(seen)
            self._ever_served.setdefault(name, set()).update(frozenset(orjson.loads(s)) for s in sets)
            if name not in self._named_by:
                self._last_named.setdefault(name, self._clock())  # it ages from now, here
        gone = [m for m in absent if m not in self._named_by and (m in self._ever_served or m in self._last_named)]
        if gone:
            self._drop_models(gone)


def _no_log(info) -> bool:
    """Whether XINFO STREAM found no log (an error for any other reason is raised)."""
    if isinstance(info, redis.ResponseError):
        if "no such key" not in str(info).lower():
            raise info
        return True
    return False


def _log_id(value: bytes | str) -> tuple[int, ...]:
    return tuple(int(part) for part in text(value).split("-"))


async def _or_503(call):
    """A Redis call of a worker endpoint: 503 while Redis is down (app.py), so the worker retries."""
    try:
        return await call
    except DOWN as exc:
        raise QueueUnavailable(f"the worker registry (Redis) is unreachable: {exc}") from None
