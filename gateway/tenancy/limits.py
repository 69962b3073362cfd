"""Per-key limits: requests and tokens per minute, requests at once, a token budget per day or
month; and what a key's traffic weighs in its model's queue (``weight``, ``max_priority``).

A limiter answers ``admit`` before a request's jobs are queued and hears ``finish`` when it ends:
- requests and tokens per minute are sliding windows of 60 s (each admitted request stays in
  its window for a minute; tokens are reserved at the request's estimate and corrected to what
  the worker counted when it finishes);
- concurrency counts requests between admit and finish (an entry a crashed replica never
  finished lapses after the request timeout);
- a budget counts the tokens of finished requests in the UTC day or month; once spent, requests
  get ``insufficient_quota`` until the period turns.

``MemoryLimiter`` holds one process's windows; a key's budget spent before the process started
is read once per period from the usage it recorded (``spent``: the key database's, which outlives a
restart). ``RedisLimiter`` holds them in Redis, so that the limits hold across replicas (and
restarts): one Lua script per admit and one per finish, on Redis's own clock.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from gateway.redis_link import RedisLink

WINDOW_S = 60.0
PRIORITY_NAMES = ("interactive", "default", "batch")  # the queue's classes, highest first
PriorityName = Literal["interactive", "default", "batch"]
Period = Literal["day", "month"]


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    budget: int | None = None  # tokens per budget_period
    budget_period: Period = "month"
    weight: float = 1.0  # its share of a queue against other keys' (fair queueing)
    max_priority: PriorityName = "default"  # the highest class its requests may ask for

    @property
    def enforced(self) -> bool:
        """Whether any limit needs the limiter (weight and priority do not)."""
        return any(v is not None for v in (self.rpm, self.tpm, self.concurrency, self.budget))

    def for_batch(self) -> Limits:
        """What holds for a batch's lines: the budget (the batch's own window paces its lines)."""
        return replace(self, rpm=None, tpm=None, concurrency=None)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object] | None) -> Limits:
        return cls(**{k: v for k, v in (raw or {}).items() if k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def parse_budget(text: str) -> tuple[int, Period]:
    """``"1000000/day"`` or ``"5000000/month"``."""
    amount, _, period = text.partition("/")
    if not amount.strip().isdigit() or period.strip() not in ("day", "month"):
        raise ValueError(f"cannot read the budget {text!r}: use TOKENS/day or TOKENS/month (e.g. 1000000/day)")
    return int(amount), period.strip()  # type: ignore[return-value]


def period_start(now: float, period: Period) -> datetime:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_end(now: float, period: Period) -> float:
    start = period_start(now, period)
    if period == "day":
        return start.timestamp() + 86400
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1).timestamp()


@dataclass
class Decision:
    """What ``admit`` said, and the state of the key's windows for the rate-limit headers."""

    refused: str | None = None  # "rpm", "tpm", "concurrency", "budget", "too_large"
    retry_after_s: float = 0.0
    ticket: str = field(default_factory=lambda: uuid.uuid4().hex)
    requests_remaining: int | None = None
    requests_reset_s: float = 0.0
    tokens_remaining: int | None = None
    tokens_reset_s: float = 0.0


class Limiter:
    async def admit(self, name: str, limits: Limits, tokens: int) -> Decision:
        raise NotImplementedError

    async def finish(self, name: str, limits: Limits, decision: Decision, tokens: int) -> None:
        """The request admitted with ``decision`` ended, having used ``tokens`` (0 if it failed)."""
        raise NotImplementedError


@dataclass
class _Windows:
    requests: deque[float] = field(default_factory=deque)  # admit times, last minute
    tokens: dict[str, tuple[float, int]] = field(default_factory=dict)  # ticket -> (time, tokens), last minute
    running: dict[str, float] = field(default_factory=dict)  # ticket -> lapses at
    spent: dict[str, int] = field(default_factory=dict)  # budget period start (ISO) -> tokens


class MemoryLimiter(Limiter):
    def __init__(self, lapse_s: float, clock=time.time, spent: Callable[[str, float], Awaitable[int]] | None = None):
        """``spent(key, since)``: the tokens the key was billed since a moment, as usage recorded."""
        self._lapse_s = lapse_s
        self._clock = clock
        self._spent = spent
        self._keys: dict[str, _Windows] = {}

    async def admit(self, name: str, limits: Limits, tokens: int) -> Decision:
        now = self._clock()
        w = self._keys.setdefault(name, _Windows())
        while w.requests and w.requests[0] <= now - WINDOW_S:
            w.requests.popleft()
        w.tokens = {t: e for t, e in w.tokens.items() if e[0] > now - WINDOW_S}
        w.running = {t: lapse for t, lapse in w.running.items() if lapse > now}
        start = period_start(now, limits.budget_period)
        period = start.isoformat()
        if limits.budget is not None and period not in w.spent and self._spent is not None:
            w.spent = {period: await self._spent(name, start.timestamp())}  # before this process, or this period
        used = sum(n for _, n in w.tokens.values())
        oldest_tokens = min((at for at, _ in w.tokens.values()), default=now)
        decision = refuse(
            limits,
            tokens,
            now,
            requests=len(w.requests),
            oldest_request=w.requests[0] if w.requests else now,
            tokens_used=used,
            oldest_tokens=oldest_tokens,
            running=len(w.running),
            spent=w.spent.get(period, 0),
        )
        if decision.refused is None:
            w.requests.append(now)
            w.tokens[decision.ticket] = (now, tokens)
            w.running[decision.ticket] = now + self._lapse_s
        return decision

    async def finish(self, name: str, limits: Limits, decision: Decision, tokens: int) -> None:
        w = self._keys.get(name)
        if w is None:
            return
        w.running.pop(decision.ticket, None)
        if decision.ticket in w.tokens:
            w.tokens[decision.ticket] = (w.tokens[decision.ticket][0], tokens)
        period = period_start(self._clock(), limits.budget_period).isoformat()
        w.spent = {period: w.spent.get(period, 0) + tokens}


def refuse(
    limits: Limits,
    tokens: int,
    now: float,
    *,
    requests: int,
    oldest_request: float,
    tokens_used: int,
    oldest_tokens: float,
    running: int,
    spent: int,
) -> Decision:
    """The decision on a request of ``tokens`` given a key's windows (the memory limiter's; the
    Redis script computes the same in Lua)."""
    d = Decision()
    if limits.rpm is not None:
        d.requests_remaining = max(0, limits.rpm - requests)
        d.requests_reset_s = max(0.0, oldest_request + WINDOW_S - now) if requests else 0.0
    if limits.tpm is not None:
        d.tokens_remaining = max(0, limits.tpm - tokens_used)
        d.tokens_reset_s = max(0.0, oldest_tokens + WINDOW_S - now) if tokens_used else 0.0
    if limits.budget is not None and spent >= limits.budget:
        d.refused, d.retry_after_s = "budget", period_end(now, limits.budget_period) - now
    elif limits.rpm is not None and requests >= limits.rpm:
        d.refused, d.retry_after_s = "rpm", d.requests_reset_s
    elif limits.tpm is not None and tokens > limits.tpm:
        d.refused, d.retry_after_s = "too_large", WINDOW_S
    elif limits.tpm is not None and tokens_used + tokens > limits.tpm:
        d.refused, d.retry_after_s = "tpm", d.tokens_reset_s
    elif limits.concurrency is not None and running >= limits.concurrency:
        d.refused, d.retry_after_s = "concurrency", 1.0
    if d.refused is None:  # what the headers say counts this request
        if d.requests_remaining is not None:
            d.requests_remaining -= 1
            d.requests_reset_s = d.requests_reset_s or WINDOW_S
        if d.tokens_remaining is not None:
            d.tokens_remaining -= tokens
            d.tokens_reset_s = d.tokens_reset_s or WINDOW_S
    return d


# KEYS: none (the prefix and the key's name build them). ARGV: prefix, name, ticket, tokens,
# rpm, tpm, concurrency, budget (-1: none), budget period key suffix, lapse_ms.
# Returns: refused ("" if admitted), requests, oldest request ms, tokens used, oldest tokens ms,
# running, spent, now ms.
ADMIT = """
local base = ARGV[1] .. ':lim:' .. ARGV[2]
local ticket, tokens = ARGV[3], tonumber(ARGV[4])
local rpm, tpm, conc, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local lapse = tonumber(ARGV[10])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rk, tk, tv, ck = base .. ':r', base .. ':t', base .. ':tv', base .. ':c'
local bk = base .. ':b:' .. ARGV[9]
redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - 60000)
local gone = redis.call('ZRANGEBYSCORE', tk, '-inf', now - 60000)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', tk, '-inf', now - 60000)
  redis.call('HDEL', tv, unpack(gone))
end
redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
local requests = redis.call('ZCARD', rk)
local first = redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')
local oldest_r = first[2] and tonumber(first[2]) or now
local used = 0
for _, v in ipairs(redis.call('HVALS', tv)) do used = used + tonumber(v) end
local firstt = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
local oldest_t = firstt[2] and tonumber(firstt[2]) or now
local running = redis.call('ZCARD', ck)
local spent = tonumber(redis.call('GET', bk) or '0')
local refused = ''
if budget >= 0 and spent >= budget then refused = 'budget'
elseif rpm >= 0 and requests >= rpm then refused = 'rpm'
elseif tpm >= 0 and tokens > tpm then refused = 'too_large'
elseif tpm >= 0 and used + tokens > tpm then refused = 'tpm'
elseif conc >= 0 and running >= conc then refused = 'concurrency'
end
if refused == '' then
  redis.call('ZADD', rk, now, ticket)
  redis.call('ZADD', tk, now, ticket)
  redis.call('HSET', tv, ticket, tokens)
  redis.call('ZADD', ck, now + lapse, ticket)
  for _, k in ipairs({rk, tk, tv}) do redis.call('PEXPIRE', k, 61000) end
  redis.call('PEXPIRE', ck, lapse + 1000)
end
return {refused, requests, oldest_r, used, oldest_t, running, spent, now}
"""

# ARGV: prefix, name, ticket, tokens, budget period key suffix, budget period ttl s.
FINISH = """
local base = ARGV[1] .. ':lim:' .. ARGV[2]
local ticket, tokens = ARGV[3], tonumber(ARGV[4])
redis.call('ZREM', base .. ':c', ticket)
if redis.call('HEXISTS', base .. ':tv', ticket) == 1 then redis.call('HSET', base .. ':tv', ticket, tokens) end
if tokens > 0 then
  local bk = base .. ':b:' .. ARGV[5]
  redis.call('INCRBY', bk, tokens)
  redis.call('EXPIRE', bk, tonumber(ARGV[6]))
end
return 1
"""


def _or_none(value: int | None) -> int:
    return -1 if value is None else value


class RedisLimiter(Limiter):
    def __init__(self, link: RedisLink, lapse_s: float):
        self._link = link
        self._lapse_ms = int(lapse_s * 1000)
        self._admit = link.redis.register_script(ADMIT)
        self._finish = link.redis.register_script(FINISH)

    async def admit(self, name: str, limits: Limits, tokens: int) -> Decision:
        period = period_start(time.time(), limits.budget_period).strftime("%Y%m%d")
        decision = Decision()
        reply = await self._admit(
            args=[
                self._link.prefix,
                name,
                decision.ticket,
                tokens,
                _or_none(limits.rpm),
                _or_none(limits.tpm),
                _or_none(limits.concurrency),
                _or_none(limits.budget),
                period,
                self._lapse_ms,
            ]
        )
        refused, requests, oldest_r, used, oldest_t, running, spent, now_ms = reply
        now = now_ms / 1000
        result = refuse(
            limits,
            tokens,
            now,
            requests=int(requests),
            oldest_request=int(oldest_r) / 1000,
            tokens_used=int(used),
            oldest_tokens=int(oldest_t) / 1000,
            running=int(running),
            spent=int(spent),
        )
        verdict = (refused.decode() if isinstance(refused, bytes) else refused) or None
        if verdict != result.refused:  # the script's verdict counts: it is what the windows recorded
            result.refused, result.retry_after_s = verdict, result.retry_after_s or 1.0
        result.ticket = decision.ticket
        return result

    async def finish(self, name: str, limits: Limits, decision: Decision, tokens: int) -> None:
        now = time.time()
        period = period_start(now, limits.budget_period).strftime("%Y%m%d")
        ttl = math.ceil(period_end(now, limits.budget_period) - now) + 86400
        await self._finish(args=[self._link.prefix, name, decision.ticket, tokens, period, ttl])
