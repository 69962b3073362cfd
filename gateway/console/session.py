"""Console sessions: an admin token, presented once at sign-in, buys a session cookie.

The cookie holds a random session id (``HttpOnly``, ``SameSite=Strict``, ``Path=/ui``, ``Secure``
over TLS). Only the SHA-256 of the id is stored, in this process or with replicas in Redis
(``P:ui:<sha256>``, so any replica knows it), with the session's CSRF token, the fingerprint of
the admin token it was opened with, and its expiry. A session ends at sign-out, after
SESSION_TTL_S, or when its admin token is no longer configured. Every change (any method but GET)
must carry the session's CSRF token in ``X-CSRF-Token``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import asdict, dataclass

import orjson

from gateway.redis_link import RedisLink, known

COOKIE = "embedq_console"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    csrf: str
    admin: str  # the fingerprint of the admin token it was opened with
    expires_at: float

    def allows(self, method: str, csrf: str) -> bool:
        return method in ("GET", "HEAD") or hmac.compare_digest(csrf.encode(), self.csrf.encode())


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    def __init__(self, link: RedisLink | None, clock=time.time):
        self._link = link
        self._clock = clock
        self._kept: dict[str, Session] = {}  # without Redis

    async def open(self, admin: str) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), admin, self._clock() + SESSION_TTL_S)
        if self._link is None:
            self._kept = {h: s for h, s in self._kept.items() if s.expires_at > self._clock()}
            self._kept[_hash(session_id)] = session
        else:
            await self._link.redis.set(self._key(session_id), orjson.dumps(asdict(session)), px=SESSION_TTL_S * 1000)
        return session_id, session

    async def find(self, session_id: str) -> Session | None:
        if not session_id:
            return None
        if self._link is None:
            session = self._kept.get(_hash(session_id))
        else:
            raw = await self._link.redis.get(self._key(session_id))
            session = known(Session, raw) if raw else None
        return session if session is not None and session.expires_at > self._clock() else None

    async def close(self, session_id: str) -> None:
        if self._link is None:
            self._kept.pop(_hash(session_id), None)
        else:
            await self._link.redis.delete(self._key(session_id))

    def _key(self, session_id: str) -> str:
        assert self._link is not None
        return self._link.key("ui", _hash(session_id))
