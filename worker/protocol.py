"""The gateway <-> worker contract, version 1. Strict: both sides are ours.

    POST /internal/v1/workers/heartbeat   WorkerHello        -> HeartbeatReply   (registers too)
    POST /internal/v1/workers/leave       WorkerBye          -> {}
    POST /internal/v1/lease               LeaseRequest       -> LeaseReply       (long-poll)
    POST /internal/v1/results             results frame      -> PostReply
    POST /internal/v1/errors              ErrorReport        -> PostReply
    POST /internal/v1/release             Release            -> PostReply        (give jobs back)
    POST /internal/v1/leases/check        Release            -> LiveJobs         (still wanted?)

A results frame carries vectors as raw little-endian float32, never JSON floats:

    uint32 LE  n        length of the JSON header
    n bytes             ResultsHeader as JSON
    rest                the float32 matrices of header.results, in order, row-major

Every job is tagged with the lease id it was handed out under; a post whose lease is stale
(expired, re-leased, or already answered) is ignored, so a slow worker cannot answer twice.
"""

from __future__ import annotations

import struct
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
PREFIX = "/internal/v1"
RESULTS_CONTENT_TYPE = "application/x-embedq-results"

# A job input is text or a list of token ids.
JobInput = str | list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCard(_Strict):
    """What a worker tells the gateway about one model it serves."""

    description: str = ""
    max_input_tokens: int = Field(gt=0)
    dimensions: int = Field(gt=0)
    matryoshka_dimensions: list[int] = []  # smaller sizes the vectors may be cut to
    truncate: bool = False  # truncate over-long inputs unless a request says otherwise


class WorkerHello(_Strict):
    worker_id: str = Field(min_length=1, max_length=200)
    checkpoint_name: str = Field(min_length=1)
    version: int = 0
    tags: list[str] = []
    models: dict[str, ModelCard] = Field(min_length=1)
    max_batch_items: int = Field(gt=0)


class HeartbeatReply(_Strict):
    worker_ttl_s: float
    lease_ttl_s: float


class WorkerBye(_Strict):
    worker_id: str


class LeaseRequest(_Strict):
    worker_id: str
    max_items: int = Field(gt=0, le=100_000)
    wait_s: float = Field(ge=0, le=60)  # long-poll: how long to wait for the first job
    # How long, from this call, the worker's engine stays busy: until then, jobs wait for
    # max_items of them (the engine could not start them sooner: a full batch beats the first
    # few stragglers); after it, the lease takes what there is.
    fill_s: float = Field(default=0.0, ge=0, le=10)
    # At most this many (estimated) tokens per lease, but always at least one job.
    max_tokens: int | None = Field(default=None, gt=0)


class Job(_Strict):
    job_id: str
    lease_id: str
    model: str
    inputs: list[JobInput] = Field(min_length=1)
    truncate: bool = False  # cut over-long inputs to the model's limit instead of failing


class LeaseReply(_Strict):
    jobs: list[Job]


class JobResult(_Strict):
    job_id: str
    lease_id: str
    rows: int = Field(gt=0)
    dims: int = Field(gt=0)
    prompt_tokens: list[int]

    @model_validator(mode="after")
    def _one_count_per_row(self) -> JobResult:
        if len(self.prompt_tokens) != self.rows:
            raise ValueError(f"{self.rows} rows but {len(self.prompt_tokens)} prompt_tokens")
        return self


class ResultsHeader(_Strict):
    worker_id: str
    results: list[JobResult] = Field(min_length=1)


# invalid_input and input_too_long are the client's fault (400); engine_error is ours (500).
ErrorCode = Literal["invalid_input", "input_too_long", "engine_error"]


class JobError(_Strict):
    job_id: str
    lease_id: str
    code: ErrorCode
    message: str = Field(max_length=2000)
    input_index: int | None = None  # index within the job's inputs


class ErrorReport(_Strict):
    worker_id: str
    errors: list[JobError] = Field(min_length=1)


class JobRef(_Strict):
    job_id: str
    lease_id: str


class Release(_Strict):
    """Jobs a worker holds but will not finish (it is stopping, or its engine died): they go
    back to the queue now instead of when their lease expires."""

    worker_id: str
    jobs: list[JobRef] = Field(min_length=1)


class LiveJobs(_Strict):
    """Which of the asked-about jobs still have that lease (their client is still waiting)."""

    job_ids: list[str]


class PostReply(_Strict):
    accepted: int
    ignored: int


class FrameError(ValueError):
    """A results frame that does not match its own header."""


_LEN = struct.Struct("<I")


def encode_results(header: ResultsHeader, matrices: list[np.ndarray]) -> bytes:
    """Build a results frame; each matrix is (rows, dims) for the header entry at its index."""
    head = header.model_dump_json().encode()
    parts = [_LEN.pack(len(head)), head]
    parts.extend(np.ascontiguousarray(m, dtype="<f4").tobytes() for m in matrices)
    return b"".join(parts)


def decode_results(frame: bytes) -> tuple[ResultsHeader, list[np.ndarray]]:
    """Split a results frame into its header and one read-only float32 matrix per result."""
    if len(frame) < _LEN.size:
        raise FrameError("results frame is shorter than its length prefix")
    (head_len,) = _LEN.unpack_from(frame)
    body_start = _LEN.size + head_len
    if body_start > len(frame):
        raise FrameError("results frame header runs past the end of the body")
    header = ResultsHeader.model_validate_json(frame[_LEN.size : body_start])
    expected = sum(r.rows * r.dims for r in header.results) * 4
    if len(frame) - body_start != expected:
        raise FrameError(f"results frame has {len(frame) - body_start} vector bytes, header says {expected}")
    matrices, offset = [], body_start
    for r in header.results:
        count = r.rows * r.dims
        matrices.append(np.frombuffer(frame, dtype="<f4", count=count, offset=offset).reshape(r.rows, r.dims))
        offset += count * 4
    return header, matrices
