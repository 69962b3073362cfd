"""One engine pass over a leased set of jobs, with each job's fate kept separate.

Jobs come in four kinds. Embedding jobs: all texts are tokenized in one call and all valid
inputs go to the engine in one call, so several clients' small requests fill one batch; an
over-long input of a model that chunks is embedded in context-sized chunks whose vectors are
averaged, weighted by their tokens. Scoring jobs (a cross-encoder's pairs) go to the engine in one
call too. Tokenizing and detokenizing jobs need only the tokenizer.

A job with a bad input fails alone, before the engine sees it. If an engine call fails, a tiny
probe tells a dead engine (EngineDead: the jobs belong to another worker) from a poisoned input
(each job is retried on its own, so one bad input cannot take its batch neighbours down with it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from contract.messages import ErrorCode, Job, JobError, JobResult
from worker.engines import Engine

log = logging.getLogger(__name__)
Ready = list[tuple[Job, list[list[int]]]]  # jobs and their inputs' token ids


class EngineDead(Exception):
    """The engine fails even a trivial input: this worker can do no more work."""


@dataclass
class BatchOutcome:
    results: list[JobResult] = field(default_factory=list)
    matrices: list[np.ndarray] = field(default_factory=list)  # one per result, same order
    errors: list[JobError] = field(default_factory=list)
    engine_inputs: int = 0
    engine_tokens: int = 0

    def add(self, job: Job, matrix: np.ndarray, tokens: list[int], **extra: object) -> None:
        """A job's answer; the frame says what the engine gave, row for row (the gateway checks it)."""
        rows = matrix.shape[0]
        self.results.append(JobResult(job_id=job.job_id, lease_id=job.lease_id, rows=rows, dims=matrix.shape[1],
                                      prompt_tokens=tokens[:rows], **extra))  # type: ignore[arg-type]  # fmt: skip
        self.matrices.append(matrix)


def run_batch(engine: Engine, jobs: list[Job], chunked: frozenset[str] = frozenset()) -> BatchOutcome:
    """``chunked``: the models whose over-long inputs are embedded in chunks."""
    outcome = BatchOutcome()
    for job in jobs:
        if job.kind in ("tokenize", "detokenize"):
            _tokenizer_job(engine, job, outcome)
    embeds = [job for job in jobs if job.kind == "embed"]
    if embeds:
        ready = _checked(engine, embeds, _tokenize(engine, embeds), chunked, outcome)
        _on_engine(engine, ready, lambda part: _embed(engine, part, outcome), outcome)
    scores = [job for job in jobs if job.kind == "score"]
    if scores:
        ready = _checked_pairs(engine, scores, outcome)
        _on_engine(engine, ready, lambda part: _score(engine, part, outcome), outcome)
    return outcome


def engine_alive(engine: Engine) -> bool:
    try:
        if engine.info.task == "score":
            engine.score([("ping", "pong")])
        else:
            engine.embed(engine.tokenize(["ping"]))
    except Exception:
        log.exception("the engine failed its health probe")
        return False
    return True


def _on_engine(engine: Engine, ready: Ready, compute: Callable[[Ready], None], outcome: BatchOutcome) -> None:
    """One engine call for all ready jobs; if it fails, a dead engine, or a job by job retry."""
    if not ready:
        return
    try:
        compute(ready)
    except Exception:
        log.exception("engine failed on a batch of %d jobs", len(ready))
        if not engine_alive(engine):
            raise EngineDead("the engine fails a trivial input too") from None
        for job, ids in ready:
            try:
                compute([(job, ids)])
            except Exception as exc:
                log.exception("engine failed on job %s", job.job_id)
                outcome.errors.append(JobError(job_id=job.job_id, lease_id=job.lease_id, code="engine_error",
                                               message=f"the engine failed on this input: {type(exc).__name__}"))  # fmt: skip


# -- embeddings ----------------------------------------------------------------------------


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


def _checked(engine: Engine, jobs: list[Job], tokenized: list[list[list[int]]], chunked: frozenset[str],
             outcome: BatchOutcome) -> Ready:  # fmt: skip
    ready = []
    for job, ids in zip(jobs, tokenized):
        error = _check(engine, job, ids, long_ok=job.model in chunked and not job.truncate)
        if error is None:
            ready.append((job, ids))
        else:
            outcome.errors.append(error)
    return ready


def _check(engine: Engine, job: Job, ids: list[list[int]], long_ok: bool = False) -> JobError | None:
    info = engine.info
    for index, seq in enumerate(ids):
        if not seq:
            return _error(job, "invalid_input", index, "is empty")
        if len(seq) > info.max_input_tokens and not long_ok:
            return _error(job, "input_too_long", index,
                          f"has {len(seq)} tokens; model {job.model!r} accepts at most {info.max_input_tokens}")  # fmt: skip
        if min(seq) < 0 or max(seq) >= info.vocab_size:
            return _error(job, "invalid_input", index, f"has a token id outside the vocabulary [0, {info.vocab_size - 1}]")
    return None


def _error(job: Job, code: ErrorCode, index: int, what: str) -> JobError:
    return JobError(job_id=job.job_id, lease_id=job.lease_id, code=code, input_index=index, message=f"input {what}")


def _embed(engine: Engine, ready: Ready, outcome: BatchOutcome) -> None:
    """One engine call for every input of every job (an over-long one as several chunks)."""
    limit = engine.info.max_input_tokens
    flat: list[list[int]] = []
    spans: list[tuple[int, list[int]]] = []  # per input: where its chunks start, and their tokens
    for _, ids in ready:
        for seq in ids:
            parts = engine.chunks(seq, limit) if len(seq) > limit else [seq]
            spans.append((len(flat), [len(part) for part in parts]))
            flat += parts
    vectors = engine.embed(flat)
    outcome.engine_inputs += len(flat)
    outcome.engine_tokens += sum(map(len, flat))
    # What the engine gave, row for row: rows it did not give are missing here too (the gateway refuses the job).
    normalized = engine.info.normalized
    pooled = [_pooled(vectors, start, weights, normalized) for start, weights in spans if start + len(weights) <= len(vectors)]
    rows = np.stack(pooled) if pooled else vectors[:0]
    start = 0
    for job, ids in ready:
        outcome.add(job, rows[start : start + len(ids)], [len(seq) for seq in ids])
        start += len(ids)


def _pooled(vectors: np.ndarray, start: int, weights: list[int], normalized: bool) -> np.ndarray:
    """An input's vector: its one row, or its chunks' rows averaged by their tokens (re-normalised
    if the model's vectors are unit-length: the mean is then as long as they are)."""
    if len(weights) == 1:
        return vectors[start]
    mean = np.average(vectors[start : start + len(weights)], axis=0, weights=weights)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12) if normalized else mean).astype(np.float32)


# -- scores, a cross-encoder's ------------------------------------------------------------


def _checked_pairs(engine: Engine, jobs: list[Job], outcome: BatchOutcome) -> Ready:
    """Score jobs whose pairs are texts the model can read; the ids here are only the lengths'."""
    ready = []
    for job in jobs:
        firsts, seconds = job.inputs, job.pairs_with
        if len(firsts) != len(seconds) or not all(isinstance(t, str) and t for t in [*firsts, *seconds]):
            outcome.errors.append(_error(job, "invalid_input", 0, "pairs must be two texts each, none empty"))
            continue
        a, b = engine.tokenize([str(t) for t in firsts]), engine.tokenize(seconds)
        lengths = [len(x) + len(y) - 1 for x, y in zip(a, b)]  # [CLS] a [SEP] b [SEP]: one special shared
        too_long = next((i for i, n in enumerate(lengths) if n > engine.info.max_input_tokens), None)
        if too_long is not None and not job.truncate:
            outcome.errors.append(_error(job, "input_too_long", too_long,
                                         f"pair has {lengths[too_long]} tokens; model {job.model!r} accepts at most "
                                         f"{engine.info.max_input_tokens}"))  # fmt: skip
            continue
        ready.append((job, [[n] for n in lengths]))
    return ready


def _score(engine: Engine, ready: Ready, outcome: BatchOutcome) -> None:
    for truncate in (False, True):  # one engine call per way of reading the pairs
        part = [(job, ids) for job, ids in ready if job.truncate is truncate]
        if not part:
            continue
        pairs = [(str(a), b) for job, _ in part for a, b in zip(job.inputs, job.pairs_with)]
        scores, tokens = engine.score(pairs, truncate=truncate)
        outcome.engine_inputs += len(pairs)
        outcome.engine_tokens += sum(tokens)
        start = 0
        for job, _ in part:
            count = len(job.inputs)
            outcome.add(job, scores[start : start + count].reshape(-1, 1), tokens[start : start + count])
            start += count


# -- the tokenizer alone ------------------------------------------------------------------


def _tokenizer_job(engine: Engine, job: Job, outcome: BatchOutcome) -> None:
    none = np.zeros((len(job.inputs), 0), dtype=np.float32)
    if job.kind == "tokenize":
        if not all(isinstance(item, str) for item in job.inputs):
            outcome.errors.append(_error(job, "invalid_input", 0, "to tokenize must be a text"))
            return
        ids = engine.tokenize([str(item) for item in job.inputs], special_tokens=job.special_tokens)
        outcome.add(job, none, [len(seq) for seq in ids], token_ids=ids)
        return
    sequences = [item for item in job.inputs if isinstance(item, list)]
    error = _check(engine, job, sequences, long_ok=True) if len(sequences) == len(job.inputs) else None
    if len(sequences) != len(job.inputs) or error is not None:
        outcome.errors.append(error or _error(job, "invalid_input", 0, "to detokenize must be token ids"))
        return
    outcome.add(job, none, [len(seq) for seq in sequences], texts=engine.detokenize(sequences))
