"""Client API keys: only their SHA-256 is stored, with name, model scope, expiry, limits
(``limits.py``) and usage times.

Three stores behind one lookup:
- ``SqliteKeyStore`` (``EMBEDQ_KEYS_DB``): what ``python -m gateway keys`` and the admin API
  manage for one gateway. The running gateway sees a new, changed or revoked key on the next
  request (SQLite's ``data_version`` tells it the file changed), and records when each key was
  last used.
- ``RedisKeyStore`` (``EMBEDQ_KEYS_REDIS=1``, with the Redis queue): the same, shared by every
  replica: ``P:keys`` holds each key as JSON, ``P:keys:version`` counts changes, and each
  replica looks at the count every half second, so a change holds everywhere within a second.
- ``FileKeyStore`` (``EMBEDQ_KEYS_FILE``): the read-only JSON that ``keys export`` prints, for a
  mounted Kubernetes Secret; re-read whenever the file changes (kubelet swaps it on update).

A key is random (256 bits), so a plain SHA-256 of it is as good as a slow password hash, and
looking it up by digest reveals nothing about the secret through timing.

The three stores are side by side here (hence the length): one lookup, one key format, one set of
operations for the CLI and the admin API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from gateway.redis_link import text
from gateway.tenancy.limits import Limits

log = logging.getLogger(__name__)
KEY_PREFIX = "eq-"
LAST_USED_EVERY_S = 60.0  # note last_used_at at most this often per key
WRITE_EVERY_S = 1.0  # write what was noted this often (off the event loop)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIFETIME_DAYS = 36500


class KeysError(Exception):
    """A keys command that cannot be done (unknown name, duplicate name, bad duration)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    models: tuple[str, ...] | None  # None: every model
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None
    revoked_at: float | None = None
    limits: Limits = field(default_factory=Limits)

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def check_name(name: str) -> None:
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
        raise KeysError(f"key names are 1-64 letters, digits, '_', '.' or '-' (got {name!r})")


def new_key(name: str, models: list[str] | None, expires_in_s: float | None, limits: Limits) -> tuple[str, ApiKey]:
    check_name(name)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    expires_at = now + expires_in_s if expires_in_s else None
    return secret, ApiKey(name, digest(secret), tuple(models) if models else None, now, expires_at, limits=limits)


def key_to_json(key: ApiKey) -> dict[str, Any]:
    raw = asdict(key)
    raw["models"] = list(key.models) if key.models else None
    raw["limits"] = key.limits.as_dict()
    return raw


def key_from_json(raw: dict[str, Any]) -> ApiKey:
    return ApiKey(
        raw["name"],
        raw["sha256"],
        tuple(raw["models"]) if raw.get("models") else None,
        raw.get("created_at", 0.0),
        raw.get("expires_at"),
        raw.get("last_used_at"),
        raw.get("revoked_at"),
        Limits.from_dict(raw.get("limits")),
    )


def changed(key: ApiKey, changes: dict[str, Any]) -> ApiKey:
    """The key with new limits (and models, under "models")."""
    models = changes.get("models", key.models)
    limits = replace(key.limits, **{k: v for k, v in changes.items() if k != "models"})
    return replace(key, limits=limits, models=tuple(models) if models else None)


def export_json(keys: list[ApiKey]) -> str:
    """The usable keys, hashes only, as the JSON FileKeyStore reads."""
    now = time.time()
    hidden = ("last_used_at", "revoked_at")
    usable = [{k: v for k, v in key_to_json(key).items() if k not in hidden} for key in keys if key.usable(now)]
    return json.dumps({"keys": usable}, indent=2)


def _duplicate(name: str) -> KeysError:
    return KeysError(f"a key named {name!r} exists already (names are never reused); choose another, e.g. {name + '-2'!r}")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_duration(text: str) -> float:
    """A key's lifetime: at least a second, at most MAX_LIFETIME_DAYS (a date past that is no date
    a calendar, or the CLI's listing, can show)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise KeysError(f"cannot read the duration {text!r}: use a number and s, m, h or d (e.g. 30d)")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not 1 <= seconds <= MAX_LIFETIME_DAYS * 86400:
        raise KeysError(
            f"a key's lifetime must be between 1s and {MAX_LIFETIME_DAYS}d (got {text!r}); omit it for a key that never expires"
        )
    return seconds


class _Lookup:
    """Digest -> key, rebuilt by subclasses when their source changes."""

    _by_digest: dict[str, ApiKey]

    def lookup(self, presented: str) -> ApiKey | None:
        self._refresh()
        wanted = digest(presented)
        key = self._by_digest.get(wanted)
        return key if key is not None and hmac.compare_digest(key.sha256, wanted) else None

    def named(self, name: str) -> ApiKey | None:
        """The key called ``name`` (revoked and expired ones too), if any."""
        self._refresh()
        return next((key for key in self._by_digest.values() if key.name == name), None)

    def touch(self, key: ApiKey, now: float) -> None:
        """Note a use of the key (stores that cannot write ignore it)."""

    writable = False

    async def run(self) -> None:
        """Background work while the gateway serves (none, unless a store writes)."""

    async def stop(self) -> None:
        """Write what is left to write, and close."""

    def _refresh(self) -> None:
        raise NotImplementedError


class SqliteKeyStore(_Lookup):
    """Lookups run on the caller's thread (a read, never blocked by a writer: WAL). Last-used
    times are kept in memory and written by ``run`` on a thread of their own, so a ``keys``
    command holding the write lock never stalls a request."""

    def __init__(self, path: str | Path):
        self._path = str(path)
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))  # owner-only; SQLite's -wal/-shm follow it
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=5)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys (name TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, models TEXT,"
            " created_at REAL NOT NULL, expires_at REAL, last_used_at REAL, revoked_at REAL, limits TEXT)"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "limits" not in columns:  # a database from before limits
            self._db.execute("ALTER TABLE api_keys ADD COLUMN limits TEXT")
        self._version: int | None = None
        self._by_digest = {}
        self._touched: dict[str, float] = {}  # name -> last use noted
        self._unwritten: dict[str, float] = {}  # name -> last use not yet written

    def close(self) -> None:
        self._db.close()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(WRITE_EVERY_S)
            await self._write_last_used()

    async def stop(self) -> None:
        await self._write_last_used()
        self.close()

    async def _write_last_used(self) -> None:
        if self._unwritten:
            used, self._unwritten = self._unwritten, {}
            await asyncio.to_thread(self._write, used)

    def _write(self, used: dict[str, float]) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, timeout=5)  # this thread's own connection
        try:
            db.executemany("UPDATE api_keys SET last_used_at = ? WHERE name = ?", [(t, n) for n, t in used.items()])
        except sqlite3.OperationalError as exc:
            log.warning("could not record when keys were last used: %s", exc)  # busy for 5 s, or read-only
        finally:
            db.close()

    writable = True

    def create(
        self, name: str, models: list[str] | None, expires_in_s: float | None, limits: Limits | None = None
    ) -> tuple[str, ApiKey]:
        """A new key; the secret is returned once and never stored."""
        secret, key = new_key(name, models, expires_in_s, limits or Limits())
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, sha256, models, created_at, expires_at, limits) VALUES (?, ?, ?, ?, ?, ?)",
                (key.name, key.sha256, json.dumps(list(key.models)) if key.models else None, key.created_at, key.expires_at,
                 json.dumps(key.limits.as_dict())),
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise _duplicate(name) from None
        self._version = None  # this connection's own writes leave data_version as it is
        return secret, key

    def update(self, name: str, **changes: Any) -> ApiKey:
        """Change a key's limits (and models); it holds from the key's next request."""
        key = changed(self.get(name), changes)
        self._db.execute(
            "UPDATE api_keys SET limits = ?, models = ? WHERE name = ?",
            (json.dumps(key.limits.as_dict()), json.dumps(list(key.models)) if key.models else None, name),
        )
        self._version = None
        return key

    def revoke(self, name: str) -> None:
        cursor = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name))
        if cursor.rowcount == 0:
            raise KeysError(f"no usable key named {name!r}")
        self._version = None

    def get(self, name: str) -> ApiKey:
        found = [key for key in self.all() if key.name == name]
        if not found:
            raise KeysError(f"no key named {name!r}")
        return found[0]

    def all(self) -> list[ApiKey]:
        rows = self._db.execute(
            "SELECT name, sha256, models, created_at, expires_at, last_used_at, revoked_at, limits FROM api_keys ORDER BY name"
        )
        return [
            ApiKey(
                r[0],
                r[1],
                tuple(json.loads(r[2])) if r[2] else None,
                r[3],
                r[4],
                r[5],
                r[6],
                Limits.from_dict(json.loads(r[7] or "{}")),
            )  # fmt: skip
            for r in rows
        ]

    def touch(self, key: ApiKey, now: float) -> None:
        if now - self._touched.get(key.name, 0.0) >= LAST_USED_EVERY_S:
            self._touched[key.name] = self._unwritten[key.name] = now

    def export(self) -> str:
        return export_json(self.all())

    def _refresh(self) -> None:
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._by_digest = {key.sha256: key for key in self.all()}
            self._version = version


class FileKeyStore(_Lookup):
    def __init__(self, path: str | Path):
        self._path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_digest = {}
        self._refresh()  # a missing or broken file fails at start-up, not at the first request

    def _refresh(self) -> None:
        stat = os.stat(self._path)
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if stamp == self._stamp:
            return
        keys = [key_from_json(e) for e in json.loads(self._path.read_text())["keys"]]
        self._by_digest = {key.sha256: key for key in keys}
        self._stamp = stamp


class RedisKeyStore(_Lookup):
    """Keys in Redis for every replica (see the module's docstring). Lookups read this process's
    copy; ``run`` refreshes it when the version count moved (within 0.5 s of a change made on
    another replica; a change made here holds here at once), and writes last-used times."""

    writable = True

    def __init__(self, url: str, password: str | None, prefix: str):
        self._redis = Redis.from_url(url, password=password, socket_connect_timeout=2.0, socket_timeout=5.0)
        self._keys, self._version_key, self._used_key = f"{prefix}:keys", f"{prefix}:keys:version", f"{prefix}:keys:used"
        self._by_digest = {}
        self._version: object = None
        self._touched: dict[str, float] = {}
        self._unwritten: dict[str, float] = {}

    def load(self) -> None:
        """Read the keys again if they changed (a blocking call: on a thread in the gateway)."""
        version = self._redis.get(self._version_key)
        if version != self._version or not self._by_digest:
            self._by_digest = {key.sha256: key for key in self.all()}
            self._version = version

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.load)
                if self._unwritten:
                    used, self._unwritten = self._unwritten, {}
                    await asyncio.to_thread(self._redis.hset, self._used_key, mapping=used)  # type: ignore[arg-type]
            except (RedisError, OSError) as exc:
                log.warning("could not refresh the API keys from Redis (serving the last ones read): %s", exc)
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._redis.close()

    def close(self) -> None:
        self._redis.close()

    def _refresh(self) -> None:
        pass  # run() refreshes off the event loop

    def touch(self, key: ApiKey, now: float) -> None:
        if now - self._touched.get(key.name, 0.0) >= LAST_USED_EVERY_S:
            self._touched[key.name] = self._unwritten[key.name] = now

    def create(
        self, name: str, models: list[str] | None, expires_in_s: float | None, limits: Limits | None = None
    ) -> tuple[str, ApiKey]:
        secret, key = new_key(name, models, expires_in_s, limits or Limits())
        if not self._redis.hsetnx(self._keys, name, json.dumps(key_to_json(key))):
            raise _duplicate(name)
        self._redis.incr(self._version_key)
        self._by_digest = {**self._by_digest, key.sha256: key}  # holds here at once; elsewhere at the next poll
        return secret, key

    def update(self, name: str, **changes: Any) -> ApiKey:
        return self._change(name, lambda key: changed(key, changes))

    def revoke(self, name: str) -> None:
        def revoked(key: ApiKey) -> ApiKey:
            if key.revoked_at is not None:
                raise KeysError(f"no usable key named {name!r}")
            return replace(key, revoked_at=time.time())

        self._change(name, revoked)

    def _change(self, name: str, change: Callable[[ApiKey], ApiKey]) -> ApiKey:
        """Read a key, change it, write it: all at once (WATCH), so that two changes racing (a
        PATCH on one replica, a revocation on another) both hold; a write that found the key
        changed since its read reads it again. Before, a PATCH could write back a key just revoked."""

        written: list[ApiKey] = []

        def read_change_write(pipe: Any) -> None:
            raw = pipe.hget(self._keys, name)
            if raw is None:
                raise KeysError(f"no key named {name!r}")
            written[:] = [change(key_from_json(json.loads(raw)))]
            pipe.multi()
            pipe.hset(self._keys, name, json.dumps(key_to_json(written[0])))
            pipe.incr(self._version_key)

        self._redis.transaction(read_change_write, self._keys)
        key = written[0]
        self._by_digest = {**self._by_digest, key.sha256: key}
        return key

    def get(self, name: str) -> ApiKey:
        raw = self._redis.hget(self._keys, name)
        if raw is None:
            raise KeysError(f"no key named {name!r}")
        return key_from_json(json.loads(raw))

    def all(self) -> list[ApiKey]:
        used = {text(k): float(v) for k, v in self._redis.hgetall(self._used_key).items()}
        keys = [key_from_json(json.loads(raw)) for raw in self._redis.hvals(self._keys)]
        return sorted((replace(k, last_used_at=used.get(k.name, k.last_used_at)) for k in keys), key=lambda k: k.name)

    def export(self) -> str:
        return export_json(self.all())


KeyStore = SqliteKeyStore | FileKeyStore | RedisKeyStore
