"""The JSON messages of the gateway <-> worker contract (see ``contract/__init__.py``). Strict:
both sides are ours, so an unknown field is an error, and every name a log line may carry has a
bounded, printable syntax."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Version 3 adds what engine calls are sized by: a job's priority class and estimated tokens
# (LeaseReply), and the worker's measured pace (LeaseRequest); and, of a model (ModelCard),
# whether its vectors are unit-length and its default prompt. A gateway speaks each worker's
# version (the hello says it) and a worker the gateway's (the heartbeat reply says it): a fleet
# of both versions keeps serving while it is upgraded.
PROTOCOL_VERSION = 3
PROTOCOLS = (2, 3)  # the versions this side speaks
PREFIX = "/internal/v1"
RESULTS_CONTENT_TYPE = "application/x-embedq-results"
# Every call carries the worker's session secret here: chosen by the worker when it starts, bound to
# its id by its first heartbeat, so that no other holder of a worker token can act in its name.
SESSION_HEADER = "X-Embedq-Session"

# Worker ids, checkpoints, model names and tags end up in logs, metrics and URLs: printable,
# no spaces or control characters, bounded.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Tag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/@+-]{1,64}$")]

# A job input is text or a list of token ids.
JobInput = str | list[int]
# What a model's worker does natively: embed (an embedding model), score (a cross-encoder), and
# tokenize (every model: its own tokenizer).
Task = Literal["embed", "score", "sparse", "tokenize"]  # sparse: SPLADE weights, a vocabulary-sized vector
JobKind = Literal["embed", "score", "tokenize", "detokenize"]


class _Strict(BaseModel):
    # No string cache: pydantic's (16,384 strings, process-wide) would keep the ids and names of
    # workers long gone, strewn over the allocator's arenas; these messages gain nothing from it.
    model_config = ConfigDict(extra="forbid", frozen=True, cache_strings=False)


# A hello is bounded, so that a registration costs the gateway little to check and keep: its
# bytes (the heartbeat's body limit), its models, each model's prompts, each engine value.
MAX_HELLO_BYTES = 256 * 1024
MAX_PROMPTS = 32
EngineValue = Annotated[str, StringConstraints(max_length=1024)] | int | float | bool | None


class ModelCard(_Strict):
    """What a worker tells the gateway about one model it serves."""

    description: str = Field(default="", max_length=2000)
    max_input_tokens: int = Field(gt=0)
    dimensions: int = Field(gt=0, le=65536)
    matryoshka_dimensions: list[int] = []  # smaller sizes the vectors may be cut to
    truncate: bool = False  # truncate over-long inputs unless a request says otherwise
    tasks: list[Task] = ["embed", "tokenize"]
    # Named prompts (e.g. "query": "query: "): the gateway puts one before each text a request asks
    # it for (input_type, prompt_name); their tokens count in prompt_tokens.
    prompts: dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default={}, max_length=MAX_PROMPTS
    )
    chunked: bool = False  # over-long inputs are embedded in context-sized chunks and averaged, not refused
    # Protocol 3. Whether the model's vectors are unit-length (its modules end in Normalize); a
    # cut to a smaller size or a chunks' mean is re-normalised only then. The prompt a text gets
    # when its request names none (sentence-transformers' default_prompt_name; "": none).
    normalized: bool = True
    default_prompt: Annotated[str, StringConstraints(max_length=64)] = ""

    @model_validator(mode="after")
    def _default_prompt_is_one(self) -> ModelCard:
        if self.default_prompt and self.default_prompt not in self.prompts:
            raise ValueError(f"default_prompt {self.default_prompt!r} is not one of the prompts")
        return self


class WorkerHello(_Strict):
    protocol: Literal[2, 3] = 3  # PROTOCOL_VERSION
    worker_id: Name
    checkpoint_name: Name
    version: int = 0
    tags: list[Tag] = Field(default=[], max_length=32)
    models: dict[Name, ModelCard] = Field(min_length=1, max_length=64)
    max_batch_items: int = Field(gt=0)
    # What the console shows of it: where it runs, which embedq, and its engine's settings.
    host: str = Field(default="", max_length=255)
    software: str = Field(default="", max_length=64)
    engine: dict[Annotated[str, StringConstraints(max_length=64)], EngineValue] = Field(default={}, max_length=32)


class HeartbeatReply(_Strict):
    worker_ttl_s: float
    lease_ttl_s: float  # the longest a lease may last, whatever hold_s asks
    protocol: Literal[2, 3] = 2  # the version the gateway speaks with this worker (absent: 2)


class WorkerBye(_Strict):
    """``draining``: the worker is stopping; it takes no more jobs, and answers or gives back
    those it holds. Otherwise it is gone: whatever it still holds goes back in line now."""

    worker_id: Name
    draining: bool = False


MAX_CALL_S, MAX_TOKEN_S = 60.0, 1.0  # the most a lease's pace may say (protocol 3)


class LeaseRequest(_Strict):
    worker_id: Name
    max_items: int = Field(gt=0, le=100_000)
    wait_s: float = Field(ge=0, le=60)  # long-poll: how long to wait for the first job
    # How long, from this call, the worker's engine stays busy: until then, jobs wait for
    # max_items of them (the engine could not start them sooner: a full batch beats the first
    # few stragglers); after it, the lease takes what there is.
    fill_s: float = Field(default=0.0, ge=0, le=10)
    # At most this many (estimated) tokens per lease, but always at least one job.
    max_tokens: int | None = Field(default=None, gt=0)
    # How long the worker expects to need for the jobs it takes now, from its engine's measured
    # pace; the lease expires then (bounded by the gateway's lease_ttl_s). None: not measured yet.
    hold_s: float | None = Field(default=None, gt=0, le=3600)
    # Protocol 3: the engine's measured pace, a call's seconds = call_s + token_s * its jobs'
    # estimated tokens (Job.tokens). The gateway sizes the call by it to the latency objective of
    # the most urgent class waiting or recently arriving. None: not measured yet (no bound).
    call_s: float | None = Field(default=None, ge=0, le=MAX_CALL_S)
    token_s: float | None = Field(default=None, ge=0, le=MAX_TOKEN_S)


class Job(_Strict):
    """embed: ``inputs`` are texts or token ids; tokenize: texts; detokenize: token ids; score:
    ``inputs`` are the first text of each pair, ``pairs_with`` the second."""

    job_id: str
    lease_id: str
    model: str
    kind: JobKind = "embed"
    inputs: list[JobInput] = Field(min_length=1)
    pairs_with: list[str] = []
    truncate: bool = False  # cut over-long inputs to the model's limit instead of failing
    special_tokens: bool = True  # tokenize: with the model's special tokens (as embedding counts them)
    # Protocol 3: its priority class (0 interactive, 1 default, 2 batch) and estimated tokens,
    # which the worker's pace is measured in.
    priority: int = Field(default=1, ge=0, le=2)
    tokens: int = Field(default=0, ge=0)


class LeaseReply(_Strict):
    jobs: list[Job]


class JobResult(_Strict):
    job_id: str
    lease_id: str
    rows: int = Field(gt=0)
    dims: int = Field(ge=0)  # embed: the vectors' size; score: 1; (de)tokenize: 0, no matrix
    prompt_tokens: list[Annotated[int, Field(ge=0, lt=2**31)]]
    token_ids: list[list[Annotated[int, Field(ge=0, lt=2**31)]]] | None = None  # tokenize
    texts: list[str] | None = None  # detokenize

    @model_validator(mode="after")
    def _one_per_row(self) -> JobResult:
        for name in ("prompt_tokens", "token_ids", "texts"):
            values = getattr(self, name)
            if values is not None and len(values) != self.rows:
                raise ValueError(f"{self.rows} rows but {len(values)} {name}")
        return self


class ResultsHeader(_Strict):
    worker_id: Name
    results: list[JobResult] = Field(min_length=1)


# invalid_input and input_too_long are the client's fault (400); engine_error is ours (500).
ErrorCode = Literal["invalid_input", "input_too_long", "engine_error"]


class JobError(_Strict):
    job_id: str
    lease_id: str
    code: ErrorCode
    message: str = Field(max_length=2000)
    input_index: int | None = Field(default=None, ge=0)  # index within the job's inputs


class ErrorReport(_Strict):
    worker_id: Name
    errors: list[JobError] = Field(min_length=1)


class JobRef(_Strict):
    job_id: str
    lease_id: str


class Release(_Strict):
    """Jobs a worker holds but will not finish (it is stopping, or its engine died): they go
    back to the queue now instead of when their lease expires."""

    worker_id: Name
    jobs: list[JobRef] = Field(min_length=1)


class LiveJobs(_Strict):
    """Which of the asked-about jobs still have that lease (their client is still waiting)."""

    job_ids: list[str]


class PostReply(_Strict):
    accepted: int
    ignored: int
