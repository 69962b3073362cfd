"""How long files and batches are kept (``EMBEDQ_FILE_RETENTION_S``, 30 days by default), and
the sweep that deletes them once it has passed:
- an uploaded file at its ``expires_at``: its creation plus the retention, or less if its client
  asked (OpenAI's ``expires_after``); never while a batch still running reads it;
- a batch's output and error files at theirs: from when the batch ended, the retention, or less
  (the batch's ``output_expires_after``); deleting one deletes the answers it is read from;
- a batch itself, its record and whatever of its answers is left, the retention after it ended.

An expired file is gone for clients at once (404); its bytes go at the next sweep a minute or more
later (``GRACE_S``: a batch created on it just before it expired is saved by then, and keeps it).
What was kept before this release is counted from its first start (``retention_since``), not
deleted at once on the upgrade. One replica sweeps a round (deleting twice would be harmless,
but a sweep reads every file and batch record).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.batches.store import ACTIVE, ENDED, BatchRecord, BatchStore, FileRecord
from gateway.redis_link import DOWN

log = logging.getLogger(__name__)
SWEEP_S = 60.0
GRACE_S = 60.0


def expired(record: FileRecord, now: float) -> bool:
    """Past its expires_at: gone for clients, whether or not a sweep has deleted it yet."""
    return record.expires_at is not None and record.expires_at <= now


def expires_at(created_at: int, asked: dict | None, retention_s: float) -> int:
    """When a file made at ``created_at`` expires: as its client asked (OpenAI's ``{"anchor":
    "created_at", "seconds": N}``), or after the retention if that is shorter."""
    return created_at + int(min(asked["seconds"] if asked else retention_s, retention_s))


class Retention:
    def __init__(self, store: BatchStore, retention_s: float):
        self._store = store
        self.retention_s = retention_s
        self._since: int | None = None

    async def run(self) -> None:
        while True:
            try:
                if await self._store.take_sweep(SWEEP_S * 0.9):
                    await self.sweep(time.time())
            except DOWN as exc:
                log.warning("cannot delete expired files and batches now: %s", exc)
            await asyncio.sleep(SWEEP_S)

    async def sweep(self, now: float) -> tuple[int, int]:
        """Delete what expired by ``now``; how many files and batches were deleted."""
        store = self._store
        if self._since is None:
            self._since = await store.retention_since(int(time.time()))
        batches = await store.batches(None)
        gone = [b for b in batches if b.status in ENDED and self._ended_at(b) + self.retention_s <= now]
        files = 0
        for batch in gone:  # its files first: a sweep cut short leaves no file without its batch
            for file_id in (batch.doc.get("output_file_id"), batch.doc.get("error_file_id")):
                record = await store.file(file_id) if file_id else None
                if record is not None:
                    await store.delete_file(record)
                    files += 1
            await store.delete_batch(batch.id)
        # Read again, not the list above: a batch created while this sweep ran keeps its input too.
        read_now = {b.doc["input_file_id"] for b in await store.batches(None) if b.status in ACTIVE}
        for record in await store.files(None):
            grace = GRACE_S if record.batch_id is None else 0.0
            if self._expiry(record) + grace <= now and record.id not in read_now:
                await store.delete_file(record)
                files += 1
        if gone or files:
            log.info("retention: deleted %d files and %d batches past their expiry", files, len(gone))
        return files, len(gone)

    def _expiry(self, record: FileRecord) -> float:
        if record.expires_at is not None:
            return record.expires_at
        return max(record.created_at, self._since or 0) + self.retention_s

    def _ended_at(self, batch: BatchRecord) -> int:
        return max(batch.doc.get(f"{batch.status}_at") or batch.doc["created_at"], self._since or 0)
