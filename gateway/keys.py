"""Client API keys: only their SHA-256 is stored, with name, model scope, expiry and usage times.

Two stores behind one lookup:
- ``SqliteKeyStore`` (``EMBEDQ_KEYS_DB``): what ``python -m gateway keys`` manages. The running
  gateway sees a new or revoked key on the next request (SQLite's ``data_version`` tells it the
  file changed), and records when each key was last used.
- ``FileKeyStore`` (``EMBEDQ_KEYS_FILE``): the read-only JSON that ``keys export`` prints, for a
  mounted Kubernetes Secret; re-read whenever the file changes (kubelet swaps it on update).

A key is random (256 bits), so a plain SHA-256 of it is as good as a slow password hash, and
looking it up by digest reveals nothing about the secret through timing.
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
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)
KEY_PREFIX = "eq-"
LAST_USED_EVERY_S = 60.0  # note last_used_at at most this often per key
WRITE_EVERY_S = 1.0  # write what was noted this often (off the event loop)
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_duration(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise KeysError(f"cannot read the duration {text!r}: use a number and s, m, h or d (e.g. 30d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


class _Lookup:
    """Digest -> key, rebuilt by subclasses when their source changes."""

    _by_digest: dict[str, ApiKey]

    def lookup(self, presented: str) -> ApiKey | None:
        self._refresh()
        wanted = digest(presented)
        key = self._by_digest.get(wanted)
        return key if key is not None and hmac.compare_digest(key.sha256, wanted) else None

    def touch(self, key: ApiKey, now: float) -> None:
        """Note a use of the key (stores that cannot write ignore it)."""

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
            " created_at REAL NOT NULL, expires_at REAL, last_used_at REAL, revoked_at REAL)"
        )
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

    def create(self, name: str, models: list[str] | None, expires_in_s: float | None) -> tuple[str, ApiKey]:
        """A new key; the secret is returned once and never stored."""
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
            raise KeysError(f"key names are 1-64 letters, digits, '_', '.' or '-' (got {name!r})")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        key = ApiKey(name, digest(secret), tuple(models) if models else None, now, now + expires_in_s if expires_in_s else None)
        try:
            self._db.execute(
                "INSERT INTO api_keys (name, sha256, models, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (key.name, key.sha256, json.dumps(list(key.models)) if key.models else None, key.created_at, key.expires_at),
            )
        except sqlite3.IntegrityError:
            raise KeysError(
                f"a key named {name!r} exists already (names are never reused); choose another, e.g. {name + '-2'!r}"
            ) from None
        return secret, key

    def revoke(self, name: str) -> None:
        cursor = self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (time.time(), name))
        if cursor.rowcount == 0:
            raise KeysError(f"no usable key named {name!r}")

    def all(self) -> list[ApiKey]:
        rows = self._db.execute(
            "SELECT name, sha256, models, created_at, expires_at, last_used_at, revoked_at FROM api_keys ORDER BY name"
        )
        return [ApiKey(r[0], r[1], tuple(json.loads(r[2])) if r[2] else None, *r[3:]) for r in rows]

    def touch(self, key: ApiKey, now: float) -> None:
        if now - self._touched.get(key.name, 0.0) >= LAST_USED_EVERY_S:
            self._touched[key.name] = self._unwritten[key.name] = now

    def export(self) -> str:
        """The usable keys, hashes only, as the JSON FileKeyStore reads."""
        now = time.time()
        keys = [
            {k: v for k, v in asdict(key).items() if k not in ("last_used_at", "revoked_at")}
            for key in self.all()
            if key.usable(now)
        ]
        return json.dumps({"keys": keys}, indent=2)

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
        entries = json.loads(self._path.read_text())["keys"]
        keys = [
            ApiKey(
                e["name"],
                e["sha256"],
                tuple(e["models"]) if e.get("models") else None,
                e.get("created_at", 0.0),
                e.get("expires_at"),
            )
            for e in entries
        ]
        self._by_digest = {key.sha256: key for key in keys}
        self._stamp = stamp
