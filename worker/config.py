"""The worker's config.toml: frozen models that mirror its tables, loaded exactly.

The file format is the one operators already write (see config.toml.example). Every key of
that format loads; keys we added have defaults; an unknown or misspelt key is an error that
names its full path, e.g. ``generator.max_model_ln: unknown key``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contract.messages import NAME_PATTERN

DtypeName = Literal["auto", "bfloat16", "float16", "float32"]


class ConfigError(Exception):
    """The config file cannot be used; the message names every offending key path."""


class _Table(BaseModel):
    # strict: a config file says what it means; "16" is not a number of sequences.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class VllmGenerator(_Table):
    """``[generator] type = "vllm"``: the keys are vLLM engine arguments."""

    type: Literal["vllm"]
    model_path: str = Field(min_length=1)
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int = Field(default=64, gt=0)
    pipeline_parallel_size: int = Field(default=1, gt=0)
    tensor_parallel_size: int = Field(default=1, gt=0)
    # vLLM >= 0.10 runs these on its pooling runner: "embed" an embedding model, "score" a
    # cross-encoder (LLM.score; its models serve rerank and score, not embeddings), "sparse" a
    # SPLADE model (a BertForMaskedLM checkpoint: a weight per vocabulary token, /embed_sparse).
    task: Literal["embed", "score", "sparse"] = "embed"
    # Additions. "auto": bfloat16 on a CPU that computes it natively, float32 on other CPUs, the
    # model's own on a GPU (worker/machine.py); an explicit value is honoured.
    dtype: DtypeName = "auto"
    enforce_eager: bool = False
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    trust_remote_code: bool = False


class FakeGenerator(_Table):
    """``[generator] type = "fake"``: deterministic vectors, for tests and gateway load tests."""

    type: Literal["fake"]
    dimensions: int = Field(default=384, gt=0)
    # What an engine call costs, as a real engine's does: a fixed part per call plus a part per
    # token. The defaults are all-MiniLM-L6-v2 on vLLM's CPU backend at bf16 (docs/performance.md:
    # 1 input 9 ms, 64 inputs 146 ms), so that tests see the trade a real engine makes between
    # small calls (the fixed part wasted) and large ones (everyone behind them waits).
    call_s: float = Field(default=0.007, ge=0)
    token_s: float = Field(default=0.00005, ge=0)
    delay_s: float = Field(default=0.0, ge=0)  # a fixed pace per call on top, whatever its size (tests that need one)
    max_model_len: int = Field(default=512, gt=0)
    max_num_seqs: int = Field(default=64, gt=0)
    # Fault injection: a batch holding an input that contains ``poison`` fails; after
    # ``dead_after_batches`` engine calls (0: never) every call fails, as a crashed engine's would;
    # after ``hang_after_batches`` every call hangs, as a stuck engine's would, while the worker
    # process stays alive and keeps heart-beating.
    poison: str = ""
    dead_after_batches: int = Field(default=0, ge=0)
    hang_after_batches: int = Field(default=0, ge=0)
    # Wrong answers, as a broken engine or worker would give: a NaN in every vector, vectors of half
    # the size, or one row fewer than inputs asked for (the gateway must refuse each).
    wrong: Literal["", "nan", "dims", "rows"] = ""
    task: Literal["embed", "score", "sparse"] = "embed"  # "score": a fake cross-encoder; "sparse": a fake SPLADE
    normalize: bool = True  # false: a model without a Normalize module (vectors of lengths 2 to 8)


Generator = Annotated[VllmGenerator | FakeGenerator, Field(discriminator="type")]


class EmbeddingTask(_Table):
    supported: bool | None = None  # not said: as the generator's task (an embedding model embeds)


class ModelEntry(_Table):
    """``[queue.models."name"]``: what the gateway advertises for this model."""

    maximum_completion_tokens: int = Field(default=0, ge=0)
    description: str = ""
    embedding_task: EmbeddingTask = EmbeddingTask()
    # Additions.
    matryoshka_dimensions: list[Annotated[int, Field(gt=0)]] = []  # sizes a request may ask for
    truncate: bool = False  # OpenAI requests truncate over-long inputs by default
    # Named prompts a request picks by input_type or prompt_name, e.g. query = "query: ", over those
    # of the model's config_sentence_transformers.json, name by name (worker/model_files.py).
    prompts: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=4096)]] = {}
    # The prompt a text gets when its request names none; not set: the model's default_prompt_name;
    # "": none.
    default_prompt: str | None = Field(default=None, max_length=64)
    # Over-long inputs embedded in context-sized chunks and averaged (weighted by tokens), not
    # refused: costs an engine input per chunk.
    chunk_long_inputs: bool = False


class QueueConfig(_Table):
    url: str
    token: str = ""
    token_file: str = ""  # addition: read the token from this file (a mounted Secret) at start-up
    checkpoint_name: str = Field(pattern=NAME_PATTERN)
    version: int = Field(default=1, ge=0)
    tags: list[str] = []
    http_request_retries: int = Field(default=7, ge=0)
    service_name: str = Field(default="worker", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,40}$")  # starts worker ids
    service_role: str = "Worker"
    models: dict[str, ModelEntry] = Field(min_length=1)
    # Additions.
    lease_wait_s: float = Field(default=20.0, gt=0, le=60)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    http_timeout_s: float = Field(default=30.0, gt=0)
    # On SIGTERM: stop leasing, finish and post what is held, for at most this long (match
    # Kubernetes' terminationGracePeriodSeconds, minus a margin).
    drain_timeout_s: float = Field(default=25.0, gt=0)

    @model_validator(mode="after")
    def _one_token_source(self) -> QueueConfig:
        if self.token and self.token_file:
            raise ValueError("queue: set token or token_file, not both")
        return self

    def resolved_token(self) -> str:
        """The worker token, read from token_file if that is how it is given."""
        if not self.token_file:
            return self.token
        try:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"queue.token_file: cannot read {self.token_file!r}: {exc.strerror}") from None

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name in models:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"model names are letters, digits and . _ : / @ + - (at most 128), got {name!r}")
        return models

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        return url.rstrip("/")


class MonitoringConfig(_Table):
    metrics_port: int = Field(default=4000, ge=0, le=65535)  # 0: an ephemeral port
    tcp_probes: list[str] = []  # "host:port" targets whose reachability is exported as a gauge

    @field_validator("tcp_probes")
    @classmethod
    def _host_port(cls, targets: list[str]) -> list[str]:
        for target in targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"each probe must be 'host:port', got {target!r}")
        return targets


class WorkerConfig(_Table):
    edition: Literal[1]
    generator: Generator
    queue: QueueConfig
    monitoring: MonitoringConfig = MonitoringConfig()

    @model_validator(mode="after")
    def _models_fit_the_task(self) -> WorkerConfig:
        """An embedding model's entries may turn embedding off; a cross-encoder's cannot turn it on."""
        supported = [m.embedding_task.supported for m in self.queue.models.values()]
        if self.generator.task == "embed" and not any(s is not False for s in supported):
            raise ValueError("queue.models: no model has embedding_task.supported = true")
        if self.generator.task == "score" and any(s is True for s in supported):
            raise ValueError('queue.models: a cross-encoder (generator.task = "score") does not embed: '
                             "set embedding_task.supported = false, or leave it out")  # fmt: skip
        return self

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, safe to print: the worker token is masked."""
        data = self.model_dump(mode="json")
        if data["queue"]["token"]:
            data["queue"]["token"] = "***"
        return data


def load_config(path: str | Path) -> WorkerConfig:
    """Read and validate a config.toml; raise ConfigError naming each bad key path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> WorkerConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  {_describe(err)}" for err in exc.errors())
        raise ConfigError(f"{source}: invalid config:\n{problems}") from None


def config_warnings(config: WorkerConfig) -> list[str]:
    """Problems that do not stop a check: the file is often checked away from its node."""
    warnings = []
    generator = config.generator
    if isinstance(generator, VllmGenerator) and not Path(generator.model_path).exists():
        warnings.append(f"generator.model_path: {generator.model_path!r} does not exist on this machine")
    if config.queue.token_file and not Path(config.queue.token_file).exists():
        warnings.append(f"queue.token_file: {config.queue.token_file!r} does not exist on this machine")
    return warnings


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_GENERATOR_TAGS = {"vllm", "fake"}


def _describe(err: Mapping[str, Any]) -> str:
    loc = list(err["loc"])
    # pydantic puts the discriminator's value in the path; the file has no such table.
    if len(loc) > 1 and loc[0] == "generator" and loc[1] in _GENERATOR_TAGS:
        del loc[1]
    path = ".".join(str(p) if _BARE_KEY.match(str(p)) else f'"{p}"' for p in loc) or "<top>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: missing required key"
    if kind == "union_tag_invalid":
        return f"{path}.type: must be one of 'vllm', 'fake', got {err['input'].get('type')!r}"
    if kind == "union_tag_not_found":
        return f"{path}.type: missing required key"
    message = err["msg"].removeprefix("Value error, ")
    if not loc:  # a check across tables names its own keys
        return message
    return f"{path}: {message} (got {err['input']!r})"
