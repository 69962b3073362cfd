"""The gateway's batch driver: it finds batches that need driving, takes each under a claim (with
replicas, one replica drives a batch; its claim lapses ``CLAIM_TTL_S`` after it stops renewing
it, and another replica takes the batch over), and drives it through OpenAI's statuses:

    validating -> in_progress -> finalizing -> completed
               -> failed (the file is wrong)   -> cancelling -> cancelled
                                               -> expired (its completion window passed)

A running batch's lines go through the same path as ``/v1/embeddings`` requests (its key, the
model's queue, the answer's shape) in the ``batch`` priority class: interactive and default
requests always go first. Only a window of its lines is in the queue at once: two engine
batches' worth of inputs for each serving worker of the model (``WINDOW_BATCHES``), so that a
batch never fills a queue that others need, yet keeps every worker busy when nobody else does
(one batch in the engine, the next waiting for it). A line refused
for now (the queue is busy, no worker is up or known yet, it timed out waiting) is tried again later; a line
the model refuses (a bad input) gets the 400 that ``/v1/embeddings`` would give, in the error file.

Each answered line is recorded at once, under its index, once (``store.py``): a batch taken over
after a crash runs only the lines with no answer, and its output has every line exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.activity import Activity
from gateway.batches import frames
from gateway.batches.lines import Line, problem, read_lines
from gateway.batches.retention import expires_at
from gateway.batches.store import BatchEnded, BatchRecord, BatchStore, FileRecord
from gateway.dialects.openai import embedded, parse_request
from gateway.errors import ApiError, ModelNotFound, Unauthorized
from gateway.http import off_loop
from gateway.metrics import GatewayMetrics
from gateway.queue import BATCH, QueueUnavailable
from gateway.redis_link import DOWN, READS_FRAMES, READS_TYPED_FRAMES
from gateway.registry import WorkerRegistry
from gateway.service import Service
from gateway.settings import GatewaySettings
from gateway.tenancy import calls
from gateway.tenancy.keys import ApiKey, KeyStore
from gateway.tenancy.usage import UsageLedger

log = logging.getLogger(__name__)
CLAIM_TTL_S = 10.0  # a replica that stops renewing its claim loses the batch after this
RENEW_S = 2.0
LOOK_S = 1.0  # how often a replica looks for batches to drive
PROGRESS_S = 1.0  # request_counts are written this often
RETRY_S = 1.0  # a line refused for now waits this long before it tries again
WINDOW_BATCHES = 2  # a batch's inputs in the queue at once: this many engine batches of each worker
MAX_WINDOW_LINES_SHARE = 4  # and at most a quarter of a queue's request bound in lines
CANCEL_LOOK_S = 0.25  # a cancel, or a change to the batch's key, holds for new lines within this (and a store read)
FLEET_LOOK_S = 10.0  # how often a replica driving batches asks whether every replica reads frames
# How a batch that ends with lines unrun says why, in each such line of its error file.
UNRUN = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "revoked": ("api_key_revoked", "The batch's API key was revoked or expired before this request was run."),
}
TRANSIENT = {408, 429, 503, 504}  # answers a line waits out: busy, no worker up, timed out in line


class LostClaim(Exception):
    """Another replica drives the batch now."""


def now_s() -> int:
    return int(time.time())


@dataclass
class _Run:
    """A batch while this gateway drives it."""

    record: BatchRecord
    lines: list[Line]
    key: ApiKey | None
    finished: list[tuple[int, bool, bytes, int]] = field(default_factory=list)  # answered, not yet recorded
    # Of the answered lines not yet recorded: what each is billed (model, inputs, tokens, error
    # code), counted with their results, not before (a line answered, then run again after a
    # takeover because its result was never recorded, would be billed twice).
    billed: dict[int, tuple[str, int, int, str | None]] = field(default_factory=dict)  # by line index
    in_flight: dict[asyncio.Task, Line] = field(default_factory=dict)
    left: Counter[str] = field(default_factory=Counter)  # lines without an answer, per model (the backlog)


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        service: Service,
        workers: WorkerRegistry,
        keys: KeyStore | None,
        usage: UsageLedger,
        activity: Activity,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
        holder: str,
    ):
        self._store, self._service, self._workers, self._keys = store, service, workers, keys
        self._usage, self._metrics, self._settings, self._holder = usage, metrics, settings, holder
        self._activity = activity
        self._driving: dict[str, asyncio.Task] = {}
        self._look = asyncio.Event()
        self._reads = READS_FRAMES - 1  # answers kept as frames once every gateway on the store reads them
        self._fleet_looked = -FLEET_LOOK_S

    def look_now(self) -> None:
        """A batch was created or cancelled here: look without waiting for the next round."""
        self._look.set()

    async def run(self) -> None:
        while True:
            try:
                for batch_id in await self._store.active():
                    if batch_id not in self._driving and await self._store.claim(batch_id, self._holder, CLAIM_TTL_S):
                        task = self._driving[batch_id] = asyncio.create_task(self._drive(batch_id))
                        task.add_done_callback(functools.partial(self._stopped_driving, batch_id))
                if self._driving and time.monotonic() - self._fleet_looked >= FLEET_LOOK_S:
                    self._fleet_looked = time.monotonic()
                    self._reads = await self._store.fleet_reads()
            except DOWN as exc:
                log.warning("cannot look for batches to drive: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look.wait(), LOOK_S)
            self._look.clear()

    def _stopped_driving(self, batch_id: str, task: asyncio.Task) -> None:
        self._driving.pop(batch_id, None)

    async def stop(self) -> None:
        """Stop driving (the gateway is going): another replica, or this one restarted, goes on."""
        tasks = list(self._driving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one batch ---------------------------------------------------------------------------

    async def _drive(self, batch_id: str) -> None:
        driver = asyncio.current_task()
        assert driver is not None
        keeper = asyncio.create_task(self._keep_claim(batch_id, driver))
        try:
            record = await self._store.batch(batch_id)
            if record is None:
                return
            lines = await self._validate(record) if record.status == "validating" else None
            if record.status in ("in_progress", "finalizing", "cancelling"):
                if lines is None:  # taken over, or after a restart: read again (it was valid)
                    lines, errors = await self._read(record, lambda _: None)
                    if errors:
                        await self._fail(record, errors)
                        return
                await self._run(record, lines)
        except asyncio.CancelledError:
            if keeper.done() and isinstance(keeper.exception(), LostClaim):
                log.warning("batch %s: another replica drives it now", batch_id)
                return
            raise
        except BatchEnded:
            log.warning("batch %s: another replica ended it meanwhile; this one stops", batch_id)
        except DOWN as exc:
            log.warning("batch %s: the store is unreachable (%s); it goes on when it is back", batch_id, exc)
        except Exception:
            log.exception("batch %s: driving it failed; it is tried again shortly", batch_id)
        finally:
            keeper.cancel()
            with contextlib.suppress(*DOWN):
                await self._store.unclaim(batch_id, self._holder)

    async def _keep_claim(self, batch_id: str, driver: asyncio.Task) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                held = await self._store.claim(batch_id, self._holder, CLAIM_TTL_S)
            except DOWN:
                continue  # if Redis stays away, the claim lapses and another replica may take it
            if not held:
                driver.cancel()
                raise LostClaim(batch_id)

    async def _validate(self, record: BatchRecord) -> list[Line]:
        """The batch's lines, its status now in_progress; or failed, with what is wrong."""
        lines, errors = await self._read(record, self._why_not(self._key(record.owner)))
        if errors:
            await self._fail(record, errors)
            return []
        models = sorted({line.model for line in lines})  # OpenAI's batches have one; ours may have several
        record.doc.update(status="in_progress", in_progress_at=now_s(), model=",".join(models) or None,
                          request_counts={"total": len(lines), "completed": 0, "failed": 0})  # fmt: skip
        await self._store.save_batch(record)
        return lines

    async def _read(self, record: BatchRecord, model_known: Callable[[str], str | None]) -> tuple[list[Line], list[dict]]:
        source = await self._store.file(record.doc["input_file_id"])
        if source is None:
            return [], [problem("file_not_found", "the input file was deleted before the batch was done", param="input_file_id")]
        content = await self._store.content(source)
        return await asyncio.to_thread(read_lines, content, record.doc["endpoint"], model_known)

    async def _fail(self, record: BatchRecord, errors: list[dict]) -> None:
        record.doc.update(status="failed", failed_at=now_s(), errors={"object": "list", "data": errors})
        await self._store.save_batch(record)
        log.info("batch %s failed: %d problems, the first on line %s", record.id, len(errors), errors[0]["line"])

    def _why_not(self, key: ApiKey | None) -> Callable[[str], str | None]:
        def why_not(model: str) -> str | None:
            if key is not None and not key.allows(model):
                return f"model {model!r} is not in this API key's scope"
            if not self._workers.knows(model):
                return f"model {model!r} not found; served models: {', '.join(sorted(self._workers.routes())) or 'none'}"
            return None

        return why_not

    def _key(self, owner: str) -> ApiKey | None:
        return self._keys.named(owner) if self._keys is not None and owner else None

    async def _run(self, record: BatchRecord, lines: list[Line]) -> None:
        run = _Run(record, lines, self._key(record.owner))
        ending = {"finalizing": "completed", "cancelling": "cancelled"}.get(record.status)
        if ending is None:
            ending = await self._run_lines(run)
        await self._finish(run, ending)

    async def _run_lines(self, run: _Run) -> str:
        """Run the lines without an answer; how the batch ends: completed, cancelled or expired."""
        record = run.record
        done = await self._store.done(record.id)
        todo = [i for i in range(len(run.lines)) if i not in done]
        todo.reverse()  # popped from the end: in file order
        run.left.update(run.lines[i].model for i in todo)
        for model, n in run.left.items():
            self._metrics.child(self._metrics.batch_backlog, model).inc(n)
        written = looked = time.monotonic()
        try:
            while todo or run.in_flight:
                if time.monotonic() - looked >= CANCEL_LOOK_S:  # not at every answer: a store read each
                    looked = time.monotonic()
                    if await self._store.cancel_requested(record.id):
                        return "cancelled"
                    if not self._key_holds(run):
                        return "revoked"
                if time.time() >= record.doc["expires_at"]:
                    return "expired"
                self._fill_window(run, todo)
                await asyncio.wait(run.in_flight, timeout=CANCEL_LOOK_S, return_when=asyncio.FIRST_COMPLETED)
                for task in [t for t in run.in_flight if t.done()]:
                    del run.in_flight[task]
                    index, answer = task.result()
                    if answer is None:
                        todo.append(index)  # refused for now, and it waited RETRY_S: it goes in again next
                    else:
                        run.finished.append((index, *answer))
                if run.finished and (not todo or time.monotonic() - written >= PROGRESS_S / 4):
                    await self._record(run)
                    written = time.monotonic()
            return "cancelled" if await self._store.cancel_requested(record.id) else "completed"
        finally:
            for task in run.in_flight:
                task.cancel()
            await asyncio.gather(*run.in_flight, return_exceptions=True)
            with contextlib.suppress(*DOWN):
                await self._record(run)
            for model, n in run.left.items():
                self._metrics.child(self._metrics.batch_backlog, model).dec(n)

    def _key_holds(self, run: _Run) -> bool:
        """Whether the batch's key may still run lines; the lines that start next see it as it is
        now (its scope and limits changed since the batch began, or since the last look)."""
        if run.key is None:
            return True
        key = self._key(run.record.owner)
        if key is None or not key.usable(time.time()):
            return False
        run.key = key
        return True

    def _fill_window(self, run: _Run, todo: list[int]) -> None:
        queued: dict[str, int] = {}
        for line in run.in_flight.values():
            queued[line.model] = queued.get(line.model, 0) + line.inputs
        max_lines = max(1, self._settings.max_queued_requests // MAX_WINDOW_LINES_SHARE)
        while todo and len(run.in_flight) < max_lines:
            line = run.lines[todo[-1]]
            room = WINDOW_BATCHES * self._workers.batch_items(line.model)
            if queued.get(line.model, 0) + line.inputs > room and queued.get(line.model, 0):
                break
            index = todo.pop()
            queued[line.model] = queued.get(line.model, 0) + line.inputs
            task = asyncio.create_task(self._line(run, index))
            run.in_flight[task] = line
            self._metrics.child(self._metrics.batch_lines, line.model, "queued").inc()

    async def _line(self, run: _Run, index: int) -> tuple[int, tuple[bool, bytes, int] | None]:
        """One line, as ``/v1/embeddings`` would answer it: whether it succeeded, the answer as kept
        (``frames.py``) and the size of its output line; None: refused for now, try again."""
        line = run.lines[index]
        call = calls.Call(key=run.key, priority=BATCH, source="batch")
        calls.enter(call)  # this task's own context: the service sees a batch call
        status, body, kept = 200, b"", b""
        try:
            if run.key is not None and not run.key.usable(time.time()):
                raise Unauthorized(f"API key {run.key.name!r} was revoked or expired while its batch ran")
            body = orjson.dumps(line.body)
            req, inputs, single = await off_loop(len(body), parse_request, body, self._settings.max_inputs)
            result = await embedded(self._service, run.key, req, inputs, single)
            kept = frames.pack(line.custom_id, result.model, result.vectors, result.prompt_tokens, req.encoding_format)
            if self._reads < (READS_FRAMES if result.vectors.dtype.kind == "f" else READS_TYPED_FRAMES):
                # a gateway of an older release reads this store: its JSON line
                kept = await off_loop(len(kept), frames.render, run.record.id, index, kept)
        except ModelNotFound:
            status = 503  # validated, so served before: after a restart its workers are yet to come back
        except ApiError as error:
            status, body = error.status, orjson.dumps({"error": {"message": error.message, "type": error.type,
                                                                  "param": error.param, "code": error.code}})  # fmt: skip
            call.code = error.code
        except (QueueUnavailable, *DOWN):
            status = 503
        if status in TRANSIENT:
            await asyncio.sleep(RETRY_S)
            return index, None
        ok = status == 200
        run.billed[index] = (line.model, call.inputs if ok else 0, call.tokens if ok else 0, None if ok else call.code)
        self._activity.batch_line(line.model, status == 200, call.inputs, call.tokens)
        self._metrics.child(self._metrics.batch_lines, line.model, "completed" if status == 200 else "failed").inc()
        self._metrics.child(self._metrics.batch_backlog, line.model).dec()
        run.left[line.model] -= 1
        if not ok:
            kept = frames.output_line(run.record.id, index, line.custom_id, status, body)
        size = len(await off_loop(len(kept), frames.render, run.record.id, index, kept))  # the file's bytes, as downloaded
        return index, (ok, kept, size)

    async def _record(self, run: _Run) -> None:
        if not run.finished:
            return
        batch, run.finished = run.finished, []
        bills = [run.billed.pop(index) for index, *_ in batch]
        written = await self._store.record(run.record.id, batch)
        owner = run.key.name if run.key else None
        billed = [bill for (index, *_), bill in zip(batch, bills) if index in written]  # not what another driver wrote
        for model, inputs, tokens, code in billed:
            self._usage.record(owner, model, "batch", inputs=inputs, tokens=tokens, code=code)
        tokens = sum(tokens for _, _, tokens, _ in billed)
        completed, failed, _, _ = await self._store.counts(run.record.id)
        run.record.doc["request_counts"] = {"total": len(run.lines), "completed": completed, "failed": failed}
        usage = run.record.doc.setdefault("usage", no_usage())
        usage["input_tokens"] += tokens
        usage["total_tokens"] += tokens
        await self._store.save_batch(run.record)

    async def _finish(self, run: _Run, ending: str) -> None:
        """Write the output and error files and the final status."""
        record, doc = run.record, run.record.doc
        if ending == "cancelled" and doc["status"] != "cancelling":
            doc.update(status="cancelling", cancelling_at=doc.get("cancelling_at") or now_s())
            await self._store.save_batch(record)
        if ending == "completed" and doc["status"] != "finalizing":
            doc.update(status="finalizing", finalizing_at=now_s())
            await self._store.save_batch(record)
        if ending in UNRUN:
            code, message = UNRUN[ending]
            done = await self._store.done(record.id)
            unrun = [self._unrun_line(record.id, i, line, code, message) for i, line in enumerate(run.lines) if i not in done]
            await self._store.record(record.id, [(i, False, kept, len(kept)) for i, kept in unrun])
        if ending == "revoked":  # the key's owner may no longer run it: cancelled, saying why
            doc["errors"] = {"object": "list", "data": [problem(*UNRUN[ending])]}
            ending = "cancelled"
            doc.update(cancelling_at=doc.get("cancelling_at") or now_s())
        completed, failed, ok_bytes, failed_bytes = await self._store.counts(record.id)
        doc["request_counts"] = {"total": len(run.lines), "completed": completed, "failed": failed}
        for ok, size, field_name in ((True, ok_bytes, "output_file_id"), (False, failed_bytes, "error_file_id")):
            if not size:
                continue
            file_id = "file-" + hashlib.sha256(f"{record.id}/{ok}".encode()).hexdigest()[:24]  # the same if written again
            name = f"{record.id}_{'output' if ok else 'error'}.jsonl"
            expiry = expires_at(now_s(), doc.get("output_expires_after"), self._settings.file_retention_s)
            await self._store.put_file(FileRecord(file_id, record.owner, "batch_output", name, size, now_s(),
                                                  await self._store.next_seq(), record.id, ok, expiry), None)  # fmt: skip
            doc[field_name] = file_id
        if ending == "completed" and await self._store.cancel_requested(record.id):
            ending = "cancelled"  # acknowledged as cancelling meanwhile: it ends as its client was told
        doc.update(status=ending, **{f"{ending}_at": now_s()})
        await self._store.save_batch(record)
        log.info("batch %s %s: %d lines completed, %d failed", record.id, ending, completed, failed)

    @staticmethod
    def _unrun_line(batch_id: str, index: int, line: Line, code: str, message: str) -> tuple[int, bytes]:
        error = {"code": code, "message": message}
        ident = f"batch_req_{frames.request_id(batch_id, index)}"
        return index, orjson.dumps({"id": ident, "custom_id": line.custom_id, "response": None, "error": error}) + b"\n"


def no_usage() -> dict[str, Any]:
    """OpenAI's batch usage before any line is answered (embeddings have input tokens only)."""
    return {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}  # fmt: skip


def batch_object(record: BatchRecord, cancel_requested: bool) -> dict[str, Any]:
    """OpenAI's batch object; a cancel asked for and not yet seen by the driver reads as cancelling."""
    doc = {"model": None, "usage": no_usage(), **record.doc}  # a batch begun before both were kept has neither
    if cancel_requested and doc["status"] in ("validating", "in_progress", "finalizing"):
        doc["status"] = "cancelling"
    return doc
