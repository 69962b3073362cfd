"""Where files and batches are kept, so that they outlive the gateway process:
- ``DirStore``: a data directory (``EMBEDQ_DATA_DIR``) of one gateway: uploaded files as files,
  batches and their results in a SQLite database beside them; a lock file keeps a second gateway
  off the same directory;
- ``RedisStore``: the queue's Redis, shared by the replicas: every replica reads every file and
  any replica can take over a batch, with no volume that many pods must mount at once.

A batch's results are kept per input line (its index in the input file), written once: a line
that is recorded again (a replica took the batch over and ran it a second time) keeps its first
answer, so the output has each line exactly once. The output and error files are not copies:
their content is read from the results, in line order, when a client downloads them (an answer
is kept as ``frames.py`` packs it, with the size of the output line it renders to).

Only the gateway driving a batch writes its record (``save_batch``); a client's cancel is a flag of
its own (``request_cancel``), so neither overwrites the other. What is deleted (a file, or a batch
past its retention: ``retention.py``) takes what it owns along: an upload its bytes, an output or
error file the answers it is read from, a batch its answers, flags and claim.

Both also keep a few values for good, each written once (``keep``: the first writer wins): a
model's int8 ranges (``vectors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, cast

import orjson

from gateway.redis_link import READS, RedisLink, known, text

READ_CHUNK = 1000  # result lines per read while streaming an output file


class DataDirBusy(Exception):
    """Another gateway holds the data directory."""


class BatchEnded(Exception):
    """The batch ended meanwhile (another driver finished it): its record is not written back."""


@dataclass
class FileRecord:
    id: str
    owner: str  # the uploading key's name; "" for anonymous clients
    purpose: str  # "batch", or "batch_output" for what a batch wrote
    filename: str
    bytes: int
    created_at: int
    seq: int  # creation order, for listing
    batch_id: str | None = None  # an output or error file: read from this batch's results
    ok: bool = True  # which of them: the output (True) or the errors (False)
    expires_at: int | None = None  # None: written before files expired; the retention from created_at

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}  # fmt: skip


@dataclass
class BatchRecord:
    id: str
    owner: str
    seq: int
    doc: dict[str, Any]  # OpenAI's batch object, as clients see it (but for a pending cancel)

    @property
    def status(self) -> str:
        return self.doc["status"]


ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "cancelled", "expired")  # a batch's status never goes back from these


class BatchStore:
    """What both stores do; the ``*_sync`` methods of ``DirStore`` run on a thread."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def next_seq(self) -> int:
        raise NotImplementedError

    async def put_file(self, record: FileRecord, content: IO[bytes] | None) -> None:
        raise NotImplementedError

    async def file(self, file_id: str) -> FileRecord | None:
        raise NotImplementedError

    async def files(self, owner: str | None) -> list[FileRecord]:
        """The owner's files (None: everyone's), newest first."""
        raise NotImplementedError

    async def content(self, record: FileRecord) -> bytes:
        """An uploaded file's bytes."""
        raise NotImplementedError

    async def delete_file(self, record: FileRecord) -> None:
        """The file and what it owns: an upload's bytes, an output or error file's answers."""
        raise NotImplementedError

    async def save_batch(self, record: BatchRecord) -> None:
        """Write the record; BatchEnded if the stored one has ended with another status (two
        drivers, one of them stale, while Redis was away: the one that ended it wins)."""
        raise NotImplementedError

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raise NotImplementedError

    async def batches(self, owner: str | None) -> list[BatchRecord]:
        """The owner's batches (None: everyone's), newest first."""
        raise NotImplementedError

    async def active(self) -> list[str]:
        """Batches some gateway must drive: validating, running, finalizing or being cancelled."""
        raise NotImplementedError

    async def delete_batch(self, batch_id: str) -> None:
        """An ended batch's record and its answers (its files are deleted first, as files)."""
        raise NotImplementedError

    async def request_cancel(self, batch_id: str) -> None:
        raise NotImplementedError

    async def cancel_requested(self, batch_id: str) -> bool:
        raise NotImplementedError

    async def record(self, batch_id: str, results: list[tuple[int, bool, bytes, int]]) -> set[int]:
        """Each line's answer (index, succeeded, the answer as kept, the size of its output line),
        unless it has one already; the indexes written (a line another driver recorded first is
        not: nor billed)."""
        raise NotImplementedError

    async def done(self, batch_id: str) -> set[int]:
        """The indexes of the lines that have an answer."""
        raise NotImplementedError

    async def counts(self, batch_id: str) -> tuple[int, int, int, int]:
        """Lines completed, lines failed, and the bytes of each's output."""
        raise NotImplementedError

    def results(self, batch_id: str, ok: bool, lines: int) -> AsyncIterator[list[tuple[int, bytes]]]:
        """The output (ok) or error file's answers as kept, (index, answer) in line order, in chunks."""
        raise NotImplementedError

    async def claim(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        """Whether ``holder`` drives the batch now (taking it if nobody does); renews its claim."""
        raise NotImplementedError

    async def fleet_reads(self) -> int:
        """What every gateway reading this store reads (``redis_link.READS``): while one reads no
        frames (``frames.py``) or none of integers (a rolling upgrade), answers it cannot read are
        kept as their JSON lines."""
        return READS

    async def retention_since(self, now: int) -> int:
        """When files and batches began to expire here (``now``, the first time it is asked): what
        was kept before is counted from then, not deleted all at once on the upgrade."""
        raise NotImplementedError

    async def take_sweep(self, ttl_s: float) -> bool:
        """Whether this gateway sweeps now: with replicas, one of them a round."""
        return True

    async def kept(self, name: str) -> bytes | None:
        """A value kept for good under ``name`` (a model's int8 ranges: ``vectors.py``), if any."""
        raise NotImplementedError

    async def keep(self, name: str, value: bytes) -> bytes:
        """Keep ``value`` under ``name`` unless one is kept already (the first writer wins); the one kept."""
        raise NotImplementedError

    async def unclaim(self, batch_id: str, holder: str) -> None: ...


class DirStore(BatchStore):
    def __init__(self, path: str):
        self._root = Path(path).expanduser()
        self._db: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        self._mutex = threading.Lock()  # one connection, used from threads one at a time

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    @staticmethod
    def lock(root: Path) -> IO[bytes]:
        """The data directory's lock, taken (it is held while the file stays open); DataDirBusy if
        another gateway holds it. ``python -m gateway`` takes it once before it serves, to fail
        in one line rather than in a traceback of its start-up."""
        root = root.expanduser()
        (root / "files").mkdir(parents=True, exist_ok=True)
        lock_file = open(root / "lock", "wb")  # noqa: SIM115  # its holder closes it
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise DataDirBusy(
                f"another gateway uses the data directory {root}: give each gateway its own "
                "EMBEDQ_DATA_DIR, or run replicas with EMBEDQ_QUEUE=redis (files and batches then live in Redis)"
            ) from None
        return lock_file

    def _open(self) -> None:
        self._lock_file = self.lock(self._root)  # held until stop()
        self._db = sqlite3.connect(self._root / "batches.db", check_same_thread=False, timeout=10)
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, seq INTEGER NOT NULL, doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, owner TEXT NOT NULL, seq INTEGER NOT NULL,
                status TEXT NOT NULL, doc TEXT NOT NULL, cancel INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS results (batch TEXT NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL,
                line BLOB NOT NULL, size INTEGER, PRIMARY KEY (batch, idx));
            CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS kept (name TEXT PRIMARY KEY, value BLOB NOT NULL);
            """
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        if "size" not in columns:  # a directory from before frames: its lines are their own size
            self._db.execute("ALTER TABLE results ADD COLUMN size INTEGER")

    async def stop(self) -> None:
        def close() -> None:
            with self._mutex:  # not under a query still running on its thread (its task was cancelled)
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)
        if self._lock_file is not None:
            self._lock_file.close()  # and with it the lock

    async def _run(self, sql: str, args: tuple = (), many: list[tuple] | None = None) -> list[tuple]:
        def work() -> list[tuple]:
            with self._mutex:
                if self._db is None:
                    raise sqlite3.ProgrammingError("the data directory's database is closed")
                with self._db:
                    return self._query(self._db, sql, args, many)

        return await asyncio.to_thread(work)

    @staticmethod
    def _query(db: sqlite3.Connection, sql: str, args: tuple, many: list[tuple] | None) -> list[tuple]:
        if many is not None:
            db.executemany(sql, many)
            return []
        return db.execute(sql, args).fetchall()

    async def next_seq(self) -> int:
        rows = await self._run("INSERT INTO counter VALUES ('seq', 1) ON CONFLICT(name) DO UPDATE SET n = n + 1 RETURNING n")
        return rows[0][0]

    async def put_file(self, record: FileRecord, content: IO[bytes] | None) -> None:
        if content is not None:
            await asyncio.to_thread(self._write, record.id, content)
        await self._run("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                        (record.id, record.owner, record.seq, orjson.dumps(asdict(record))))  # fmt: skip

    def _write(self, file_id: str, content: IO[bytes]) -> None:
        """Written whole, then renamed into place: a crash leaves no half file under the id."""
        final = self._root / "files" / file_id
        partial = final.with_suffix(".partial")
        with open(partial, "wb") as out:
            shutil.copyfileobj(content, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(final)

    async def file(self, file_id: str) -> FileRecord | None:
        rows = await self._run("SELECT doc FROM files WHERE id = ?", (file_id,))
        return known(FileRecord, rows[0][0]) if rows else None

    async def files(self, owner: str | None) -> list[FileRecord]:
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = await self._run(f"SELECT doc FROM files {where} ORDER BY seq DESC", args)
        return [known(FileRecord, doc) for (doc,) in rows]

    async def content(self, record: FileRecord) -> bytes:
        return await asyncio.to_thread((self._root / "files" / record.id).read_bytes)

    async def delete_file(self, record: FileRecord) -> None:
        await self._run("DELETE FROM files WHERE id = ?", (record.id,))
        if record.batch_id is not None:
            await self._run("DELETE FROM results WHERE batch = ? AND ok = ?", (record.batch_id, record.ok))
            return
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread((self._root / "files" / record.id).unlink)

    async def delete_batch(self, batch_id: str) -> None:
        await self._run("DELETE FROM results WHERE batch = ?", (batch_id,))
        await self._run("DELETE FROM batches WHERE id = ?", (batch_id,))

    async def save_batch(self, record: BatchRecord) -> None:
        written = await self._run(
            "INSERT INTO batches (id, owner, seq, status, doc) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET status = excluded.status, doc = excluded.doc "
            f"WHERE batches.status NOT IN {ENDED} OR batches.status = excluded.status RETURNING id",
            (record.id, record.owner, record.seq, record.status, orjson.dumps(record.doc)),
        )
        if not written:
            raise BatchEnded(record.id)

    async def batch(self, batch_id: str) -> BatchRecord | None:
        rows = await self._run("SELECT id, owner, seq, doc FROM batches WHERE id = ?", (batch_id,))
        return _batch_row(rows[0]) if rows else None

    async def batches(self, owner: str | None) -> list[BatchRecord]:
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = await self._run(f"SELECT id, owner, seq, doc FROM batches {where} ORDER BY seq DESC", args)
        return [_batch_row(row) for row in rows]

    async def active(self) -> list[str]:
        marks = ", ".join("?" * len(ACTIVE))
        return [row[0] for row in await self._run(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)]

    async def request_cancel(self, batch_id: str) -> None:
        await self._run("UPDATE batches SET cancel = 1 WHERE id = ?", (batch_id,))

    async def cancel_requested(self, batch_id: str) -> bool:
        rows = await self._run("SELECT cancel FROM batches WHERE id = ?", (batch_id,))
        return bool(rows and rows[0][0])

    async def record(self, batch_id: str, results: list[tuple[int, bool, bytes, int]]) -> set[int]:
        before = await self.done(batch_id)  # one gateway on the directory: one driver, no race
        await self._run("INSERT OR IGNORE INTO results (batch, idx, ok, line, size) VALUES (?, ?, ?, ?, ?)",
                        many=[(batch_id, index, ok, kept, size) for index, ok, kept, size in results])  # fmt: skip
        return {index for index, *_ in results if index not in before}

    async def done(self, batch_id: str) -> set[int]:
        return {row[0] for row in await self._run("SELECT idx FROM results WHERE batch = ?", (batch_id,))}

    async def counts(self, batch_id: str) -> tuple[int, int, int, int]:
        rows = await self._run(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0), COALESCE(SUM(ok * COALESCE(size, length(line))), 0),"
            " COALESCE(SUM((1 - ok) * COALESCE(size, length(line))), 0) FROM results WHERE batch = ?",
            (batch_id,),
        )
        return rows[0]

    async def results(self, batch_id: str, ok: bool, lines: int) -> AsyncIterator[list[tuple[int, bytes]]]:
        after = -1
        while True:
            rows = await self._run(
                "SELECT idx, line FROM results WHERE batch = ? AND ok = ? AND idx > ? ORDER BY idx LIMIT ?",
                (batch_id, ok, after, READ_CHUNK),
            )
            if not rows:
                return
            after = rows[-1][0]
            yield rows

    async def claim(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return True  # one gateway per data directory (the lock file)

    async def retention_since(self, now: int) -> int:
        await self._run("INSERT OR IGNORE INTO counter VALUES ('retention_since', ?)", (now,))
        return (await self._run("SELECT n FROM counter WHERE name = 'retention_since'"))[0][0]

    async def kept(self, name: str) -> bytes | None:
        rows = await self._run("SELECT value FROM kept WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    async def keep(self, name: str, value: bytes) -> bytes:
        await self._run("INSERT OR IGNORE INTO kept VALUES (?, ?)", (name, value))
        kept = await self.kept(name)
        assert kept is not None, "just kept"
        return kept


def _batch_row(row: tuple) -> BatchRecord:
    batch_id, owner, seq, doc = row
    return BatchRecord(batch_id, owner, seq, orjson.loads(doc))


class RedisStore(BatchStore):
    """Keys under the queue's prefix P: ``P:files`` and ``P:batches`` (id -> record),
    ``P:file:<id>`` (an upload's bytes), ``P:batches:active`` and ``P:batches:cancel`` (sets),
    ``P:batch:<id>:ok`` / ``:failed`` (line index -> answer), ``:bytes`` (their output's sizes) and
    ``:driver`` (the replica driving it, expiring unless renewed); ``P:retention:since`` and
    ``:sweeper`` (the replica sweeping this round); ``P:kept:<name>`` (values kept for good)."""

    # KEYS: the batch's ok, failed and bytes hashes. ARGV: 0, 0, then per line index, ok, answer, size.
    RECORD = """
    local written = {}
    for i = 3, #ARGV, 4 do
      local hash = ARGV[i + 1] == '1' and KEYS[1] or KEYS[2]
      if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 and redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
        redis.call('HSET', hash, ARGV[i], ARGV[i + 2])
        redis.call('HINCRBY', KEYS[3], ARGV[i + 1] == '1' and 'ok' or 'failed', ARGV[i + 3])
        table.insert(written, ARGV[i])
      end
    end
    return written
    """
    # KEYS: the batches hash, the active set. ARGV: id, record, status, active ('1' or '0').
    SAVE = """
    local old = redis.call('HGET', KEYS[1], ARGV[1])
    if old then
      local was = cjson.decode(old)['doc']['status']
      if was ~= ARGV[3] and (was == 'completed' or was == 'failed' or was == 'cancelled' or was == 'expired') then
        return 0
      end
    end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    if ARGV[4] == '1' then redis.call('SADD', KEYS[2], ARGV[1]) else redis.call('SREM', KEYS[2], ARGV[1]) end
    return 1
    """
    CLAIM = """
    local holder = redis.call('GET', KEYS[1])
    if holder == false or holder == ARGV[1] then
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
      return 1
    end
    return 0
    """
    UNCLAIM = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
    return 0
    """

    def __init__(self, link: RedisLink):
        self._link = link
        self._redis = link.redis
        self._record = self._redis.register_script(self.RECORD)
        self._save = self._redis.register_script(self.SAVE)
        self._claim = self._redis.register_script(self.CLAIM)
        self._unclaim = self._redis.register_script(self.UNCLAIM)

    def _key(self, *parts: str) -> str:
        return self._link.key(*parts)

    async def next_seq(self) -> int:
        return int(await self._redis.incr(self._key("batches", "seq")))

    async def put_file(self, record: FileRecord, content: IO[bytes] | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            if content is not None:
                pipe.set(self._key("file", record.id), await asyncio.to_thread(content.read))
            pipe.hset(self._key("files"), record.id, orjson.dumps(asdict(record)))
            await pipe.execute()

    async def file(self, file_id: str) -> FileRecord | None:
        raw = await self._redis.hget(self._key("files"), file_id)
        return known(FileRecord, raw) if raw else None

    async def files(self, owner: str | None) -> list[FileRecord]:
        every = [known(FileRecord, v) for v in (await self._redis.hgetall(self._key("files"))).values()]
        return sorted((f for f in every if owner is None or f.owner == owner), key=lambda f: -f.seq)

    async def content(self, record: FileRecord) -> bytes:
        return cast(bytes, await self._redis.get(self._key("file", record.id)) or b"")

    async def delete_file(self, record: FileRecord) -> None:
        # UNLINK: a batch's answers may be hundreds of MB, freed off Redis's main thread.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key("files"), record.id)
            if record.batch_id is None:
                pipe.unlink(self._key("file", record.id))
            else:
                ok, failed, sizes = self._results(record.batch_id)
                pipe.unlink(ok if record.ok else failed)
                pipe.hdel(sizes, "ok" if record.ok else "failed")
            await pipe.execute()

    async def delete_batch(self, batch_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key("batches"), batch_id)
            pipe.srem(self._key("batches", "active"), batch_id)
            pipe.srem(self._key("batches", "cancel"), batch_id)
            pipe.unlink(*self._results(batch_id), self._key("batch", batch_id, "driver"))
            await pipe.execute()

    async def save_batch(self, record: BatchRecord) -> None:
        keys = [self._key("batches"), self._key("batches", "active")]
        args: list[Any] = [record.id, orjson.dumps(asdict(record)), record.status, "1" if record.status in ACTIVE else "0"]
        if not await self._save(keys=keys, args=args):
            raise BatchEnded(record.id)

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self._redis.hget(self._key("batches"), batch_id)
        return known(BatchRecord, raw) if raw else None

    async def batches(self, owner: str | None) -> list[BatchRecord]:
        every = [known(BatchRecord, v) for v in (await self._redis.hgetall(self._key("batches"))).values()]
        return sorted((b for b in every if owner is None or b.owner == owner), key=lambda b: -b.seq)

    async def active(self) -> list[str]:
        return sorted(text(m) for m in await self._redis.smembers(self._key("batches", "active")))

    async def request_cancel(self, batch_id: str) -> None:
        await self._redis.sadd(self._key("batches", "cancel"), batch_id)

    async def cancel_requested(self, batch_id: str) -> bool:
        return bool(await self._redis.sismember(self._key("batches", "cancel"), batch_id))

    def _results(self, batch_id: str) -> list[str]:
        return [self._key("batch", batch_id, "ok"), self._key("batch", batch_id, "failed"), self._key("batch", batch_id, "bytes")]

    async def record(self, batch_id: str, results: list[tuple[int, bool, bytes, int]]) -> set[int]:
        args: list[Any] = [0, 0]
        for index, ok, kept, size in results:
            args += [index, "1" if ok else "0", kept, size]
        return {int(index) for index in await self._record(keys=self._results(batch_id), args=args)}

    async def done(self, batch_id: str) -> set[int]:
        ok, failed, _ = self._results(batch_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hkeys(ok)
            pipe.hkeys(failed)
            ok_keys, failed_keys = await pipe.execute()
        return {int(k) for k in [*ok_keys, *failed_keys]}

    async def counts(self, batch_id: str) -> tuple[int, int, int, int]:
        ok, failed, sizes = self._results(batch_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hlen(ok)
            pipe.hlen(failed)
            pipe.hmget(sizes, "ok", "failed")
            n_ok, n_failed, (ok_bytes, failed_bytes) = await pipe.execute()
        return n_ok, n_failed, int(ok_bytes or 0), int(failed_bytes or 0)

    async def results(self, batch_id: str, ok: bool, lines: int) -> AsyncIterator[list[tuple[int, bytes]]]:
        name = self._results(batch_id)[0 if ok else 1]
        for start in range(0, lines, READ_CHUNK):
            indexes = list(range(start, min(lines, start + READ_CHUNK)))
            found = await self._redis.hmget(name, indexes)
            chunk = [(index, cast(bytes, kept)) for index, kept in zip(indexes, found, strict=True) if kept is not None]
            if chunk:
                yield chunk

    async def claim(self, batch_id: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._claim(keys=[self._key("batch", batch_id, "driver")], args=[holder, int(ttl_s * 1000)]))

    async def unclaim(self, batch_id: str, holder: str) -> None:
        await self._unclaim(keys=[self._key("batch", batch_id, "driver")], args=[holder])

    async def fleet_reads(self) -> int:
        return await self._link.fleet_reads()

    async def retention_since(self, now: int) -> int:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key("retention", "since"), now, nx=True)
            pipe.get(self._key("retention", "since"))
            _, since = await pipe.execute()
        return int(since)

    async def take_sweep(self, ttl_s: float) -> bool:
        return bool(await self._redis.set(self._key("retention", "sweeper"), self._link.replica, nx=True, px=int(ttl_s * 1000)))

    async def kept(self, name: str) -> bytes | None:
        return cast(bytes | None, await self._redis.get(self._key("kept", name)))

    async def keep(self, name: str, value: bytes) -> bytes:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key("kept", name), value, nx=True)
            pipe.get(self._key("kept", name))
            _, kept = await pipe.execute()
        return cast(bytes, kept)
