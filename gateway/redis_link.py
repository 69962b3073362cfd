"""One gateway replica's link to the shared Redis (``EMBEDQ_QUEUE=redis``).

Three connections' worth of clients: ``redis`` for commands, ``blocking`` for the replica's
blocking result reads, and one subscription to the event channel ``P:events`` through which
replicas tell each other "N inputs arrived on queue Q" and "worker W left". The link also keeps the
key ``P:alive:<replica>`` fresh; jobs whose owner's key lapsed are dropped by the queue scripts.
Its value says what the replica can read (``READS``), so that a rolling upgrade writes nothing a
replica still running the older release cannot read (``fleet_reads``).

Redis going away is survived: commands raise (the queue turns that into 503s), the event
subscription and the liveness key come back by themselves once Redis does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError, ResponseError

from gateway.errors import QueueDown
from gateway.loops import Loops

log = logging.getLogger(__name__)
ALIVE_REFRESH_S = 1.0
ALIVE_TTL_MS = 5000  # a replica silent this long counts as gone
# What a release reads, in its liveness key; replicas from before wrote "1". 2: batch answers kept
# as float32 frames (gateway/batches/frames.py); 3: frames of integers too (a line's output_dtype).
READS_FRAMES = 2
READS_TYPED_FRAMES = 3
READS = READS_TYPED_FRAMES
RECONNECT_S = 0.5
DOWN = (RedisError, OSError)  # what a command raises while Redis cannot be reached


class RedisTooOld(Exception):
    pass


_said_down_at = 0.0


def known(cls: Any, raw: bytes | str) -> Any:
    """A dataclass record read from Redis, with the fields this version knows: a newer replica,
    in a rolling upgrade, may have written more, which must not make the record unreadable."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in orjson.loads(raw).items() if k in fields})


def unreachable(exc: BaseException, retry_after_s: int) -> QueueDown:
    """The one answer to a call that Redis (or the queue on it) failed: 503 with Retry-After, in
    words that name no host, port or command; the detail goes to the log, at most every 5 s. An
    error Redis answered (a script's, not a failover's read-only refusal) may be a bug of ours:
    logged with its traceback."""
    global _said_down_at
    if isinstance(exc, ResponseError) and not isinstance(exc, ReadOnlyError):
        log.error("Redis refused a command (answered 503)", exc_info=exc)
    elif time.monotonic() - _said_down_at >= 5:
        _said_down_at = time.monotonic()
        log.warning("answering 503 while Redis is unreachable: %s", exc)
    return QueueDown("the gateway's shared store (Redis) is unreachable; retry shortly",
                     headers={"Retry-After": str(retry_after_s)})  # fmt: skip


def safe_url(url: str) -> str:
    """The URL with any password in it masked, for a log line: in the userinfo
    (``redis://user:secret@host``) or as a query parameter (``?password=secret``)."""
    scheme, sep, rest = url.partition("://")
    netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:netloc_end].rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    masked = scheme + sep + userinfo + at + host + rest[netloc_end:]
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", masked, flags=re.I)


def text(value: bytes | str) -> str:
    """A value read from Redis (bytes: the clients do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else value


def unless_cancelled() -> None:
    """Call where a loop catches DOWN: redis-py can turn the cancellation of a blocking command
    into a connection error, which must not keep a cancelled loop alive."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisLink:
    def __init__(self, url: str, password: str | None, prefix: str):
        self.replica = uuid.uuid4().hex[:12]
        self.prefix = prefix
        # No retry: a command whose answer was lost may have run (a LEASE, an HINCRBY of usage, an
        # ANSWER), and running it again takes jobs for nobody or counts twice. The connections a
        # Redis restart leaves dead are closed when the subscription sees Redis go (_drop_pooled).
        # (redis-py's own default is three retries with backoff, for every client.)
        once = Retry(NoBackoff(), 0)
        self.redis = Redis.from_url(url, password=password, socket_connect_timeout=2.0, socket_timeout=5.0, retry=once)
        # Blocking pops wait at most a second (a pop retried after its reply was lost loses what it
        # popped); the subscription waits for events as long as it takes, and notices Redis go at once.
        self.blocking = Redis.from_url(url, password=password, socket_connect_timeout=2.0, socket_timeout=10.0, retry=once)
        self._subscriber = Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=2.0,
            socket_timeout=None,
            socket_keepalive=True,
            retry=once,
        )
        self._handlers: dict[str, list[Callable[[str], None]]] = {}
        self._tasks: list[asyncio.Task] = []

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def on_event(self, kind: str, handler: Callable[[str], None]) -> None:
        """Call handler(argument) for every "kind argument" event any replica publishes;
        kind "reconnected" (argument "") after the subscription was re-established."""
        self._handlers.setdefault(kind, []).append(handler)

    def event_command(self, pipe, kind: str, argument: str) -> None:
        """Queue a PUBLISH of the event on a pipeline."""
        pipe.publish(self.key("events"), f"{kind} {argument}")

    async def start(self, loops: Loops | None = None) -> None:
        try:
            version = (await self.redis.info("server"))["redis_version"]
            await self._mark_alive()
        except DOWN as exc:
            log.error("Redis is unreachable at start-up (%s); retrying in the background", exc)
        else:
            if int(version.split(".")[0]) < 7:
                raise RedisTooOld(f"Redis {version} is too old: the queue needs Redis 7 or later (it uses BLMPOP)")
        loops = loops or Loops()
        self._tasks = [loops.keep("redis alive", self._alive_forever), loops.keep("redis events", self._listen_forever)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.redis.delete(self.key("alive", self.replica))
        except DOWN:
            pass
        for client in (self.redis, self.blocking, self._subscriber):
            await client.aclose()

    async def _mark_alive(self) -> None:
        await self.redis.set(self.key("alive", self.replica), str(READS).encode(), px=ALIVE_TTL_MS)

    async def fleet_reads(self) -> int:
        """The least of what the live replicas read: what may be written now for all to read.
        It scans the keyspace: call it every few seconds, not per request."""
        names = [name async for name in self.redis.scan_iter(match=self.key("alive", "*"), count=1000)]
        marks = await self.redis.mget(names) if names else []
        return min((int(mark) if mark.isdigit() else 1 for mark in marks if mark is not None), default=READS)

    async def _alive_forever(self) -> None:
        down = False
        while True:
            await asyncio.sleep(ALIVE_REFRESH_S)
            try:
                await self._mark_alive()
                if down:
                    log.warning("Redis is reachable again")
                down = False
            except DOWN as exc:
                unless_cancelled()
                if not down:
                    log.error("Redis is unreachable: %s", exc)
                down = True

    async def _listen_forever(self) -> None:
        first = True
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.key("events"))
                if not first:
                    self._dispatch("reconnected", "")  # events may have been missed meanwhile
                first = False
                async for message in pubsub.listen():
                    kind, _, argument = message["data"].decode().partition(" ")
                    self._dispatch(kind, argument)
            except DOWN:
                unless_cancelled()
                await self._drop_pooled()
                await asyncio.sleep(RECONNECT_S)
            finally:
                await pubsub.aclose()

    async def _drop_pooled(self) -> None:
        """Redis went away (the subscription broke): every pooled connection is dead, and each
        would fail its next command once Redis is back. Closed now, they reconnect when used."""
        for client in (self.redis, self.blocking):
            await client.connection_pool.disconnect()

    def _dispatch(self, kind: str, argument: str) -> None:
        for handler in self._handlers.get(kind, ()):
            handler(argument)
