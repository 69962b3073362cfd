"""One engine pass over a leased set of jobs, with each job's fate kept separate.

All texts are tokenized in one call and all valid inputs go to the engine in one call, so
several clients' small requests fill one batch. A job with a bad input fails alone, before
the engine sees it. If the engine call fails, a tiny probe tells a dead engine (EngineDead:
the jobs belong to another worker) from a poisoned input (each job is retried on its own, so
one bad input cannot take its batch neighbours down with it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from contract.messages import ErrorCode, Job, JobError, JobResult
from worker.engines import Engine

log = logging.getLogger(__name__)


class EngineDead(Exception):
    """The engine fails even a trivial input: this worker can do no more work."""


@dataclass
class BatchOutcome:
    results: list[JobResult] = field(default_factory=list)
    matrices: list[np.ndarray] = field(default_factory=list)  # one per result, same order
    errors: list[JobError] = field(default_factory=list)
    engine_inputs: int = 0
    engine_tokens: int = 0


def run_batch(engine: Engine, jobs: list[Job]) -> BatchOutcome:
    outcome = BatchOutcome()
    tokenized = _tokenize(engine, jobs)
    ready: list[tuple[Job, list[list[int]]]] = []
    for job, ids in zip(jobs, tokenized):
        error = _check(engine, job, ids)
        if error is None:
            ready.append((job, ids))
        else:
            outcome.errors.append(error)
    if not ready:
        return outcome
    try:
        _embed(engine, ready, outcome)
    except Exception:
        log.exception("engine failed on a batch of %d jobs", len(ready))
        if not engine_alive(engine):
            raise EngineDead("the engine fails a trivial input too") from None
        _embed_one_by_one(engine, ready, outcome)
    return outcome


def engine_alive(engine: Engine) -> bool:
    try:
        engine.embed(engine.tokenize(["ping"]))
    except Exception:
        log.exception("the engine failed its health probe")
        return False
    return True


def _tokenize(engine: Engine, jobs: list[Job]) -> list[list[list[int]]]:
    """Token ids per job and input: one tokenizer call for all texts (two if some truncate)."""
    limit = engine.info.max_input_tokens
    text_ids = {}
    for truncate in (False, True):
        texts = [item for job in jobs if job.truncate is truncate for item in job.inputs if isinstance(item, str)]
        text_ids[truncate] = iter(engine.tokenize(texts, truncate=truncate) if texts else [])
    return [
        [next(text_ids[job.truncate]) if isinstance(item, str) else item[:limit] if job.truncate else item for item in job.inputs]
        for job in jobs
    ]


def _check(engine: Engine, job: Job, ids: list[list[int]]) -> JobError | None:
    info = engine.info
    for index, seq in enumerate(ids):
        if not seq:
            return _error(job, "invalid_input", index, "is empty")
        if len(seq) > info.max_input_tokens:
            return _error(
                job,
                "input_too_long",
                index,
                f"has {len(seq)} tokens; model {job.model!r} accepts at most {info.max_input_tokens}",
            )
        if min(seq) < 0 or max(seq) >= info.vocab_size:
            return _error(
                job,
                "invalid_input",
                index,
                f"has a token id outside the vocabulary [0, {info.vocab_size - 1}]",
            )
    return None


def _error(job: Job, code: ErrorCode, index: int, what: str) -> JobError:
    return JobError(
        job_id=job.job_id,
        lease_id=job.lease_id,
        code=code,
        input_index=index,
        message=f"input {what}",
    )


def _embed(engine: Engine, ready: list[tuple[Job, list[list[int]]]], outcome: BatchOutcome) -> None:
    flat = [seq for _, ids in ready for seq in ids]
    vectors = engine.embed(flat)
    outcome.engine_inputs += len(flat)
    outcome.engine_tokens += sum(map(len, flat))
    start = 0
    for job, ids in ready:
        rows = vectors[start : start + len(ids)]
        start += len(ids)
        # The frame says what the engine gave, row for row: the gateway checks it against the job.
        outcome.results.append(
            JobResult(
                job_id=job.job_id,
                lease_id=job.lease_id,
                rows=rows.shape[0],
                dims=rows.shape[1],
                prompt_tokens=[len(seq) for seq in ids][: rows.shape[0]],
            )
        )
        outcome.matrices.append(rows)


def _embed_one_by_one(engine: Engine, ready: list[tuple[Job, list[list[int]]]], outcome: BatchOutcome) -> None:
    for job, ids in ready:
        try:
            _embed(engine, [(job, ids)], outcome)
        except Exception as exc:
            log.exception("engine failed on job %s", job.job_id)
            outcome.errors.append(
                JobError(
                    job_id=job.job_id,
                    lease_id=job.lease_id,
                    code="engine_error",
                    message=f"the engine failed on this input: {type(exc).__name__}",
                )
            )
