"""The gateway's settings: one frozen model, read once at start-up from EMBEDQ_* variables.

Each field ``name`` is set by the variable ``EMBEDQ_<NAME>`` (lists comma-separated);
``--host`` / ``--port`` on the command line win over the environment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "EMBEDQ_"


class SettingsError(Exception):
    """Settings that cannot be used; the message names the variable."""


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bearer tokens workers must present; empty means none is configured (see workers_open).
    worker_tokens: tuple[str, ...] = ()
    # Accept workers without a token on a non-loopback address. Only for trusted networks.
    allow_open_workers: bool = False
    keys_db: str | None = None  # SQLite file of client API keys (python -m gateway keys ...)
    keys_file: str | None = None  # read-only JSON of keys (keys export), e.g. a mounted Secret
    keys_redis: bool = False  # keys in Redis, shared by the replicas (EMBEDQ_QUEUE=redis)
    # Bearer tokens for the admin API (/admin/v1/...) and nothing else.
    admin_tokens: tuple[str, ...] = ()
    # The web console at /ui/ (sign-in with an admin token); false: no /ui routes at all.
    ui: bool = True
    usage_retention_days: float = Field(default=400.0, gt=0)  # hourly usage kept this long
    # Uploaded files and batches, kept across restarts (with EMBEDQ_QUEUE=redis they live in Redis).
    data_dir: str = "~/.local/share/embedq"
    # How long an uploaded file, and a batch with its output and error files once it has ended, are
    # kept (docs/batches.md, "How long they are kept"); a client may ask for less. 30 days: OpenAI's
    # default for batch files, and the most it lets a client ask for.
    file_retention_s: float = Field(default=30 * 86400.0, gt=0)
    # A request whose predicted wait in its model's queue is longer gets 429 at once (see
    # admission.py); None: 10 s, or half the request timeout if that is shorter. Short, so that
    # an overloaded queue holds little and serves fresh requests again soon after a burst.
    max_queue_wait_s: float | None = Field(default=None, gt=0)
    # Serve clients without API keys on a non-loopback address. Only for trusted networks.
    allow_anonymous_clients: bool = False
    request_timeout_s: float = Field(default=60.0, gt=0)
    # The longest a lease lasts: workers ask for less, sized to their engine's pace (a stuck
    # worker's jobs come back after that), and sit out this long when they let one expire.
    lease_ttl_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)  # leases per job before its request fails
    # A worker silent this long is dropped, and its leases go back in line at once.
    worker_ttl_s: float = Field(default=10.0, gt=0)
    # A model no live worker has named for this long is forgotten (it answers 404, not 503).
    model_ttl_s: float = Field(default=3600.0, gt=0)
    job_max_inputs: int = Field(default=32, ge=1)  # requests are split into jobs of this size
    # ... and of at most this many estimated tokens (an input above it is a job alone): a call can
    # be bounded no finer than one job (see the objectives).
    job_max_tokens: int = Field(default=256, ge=1)
    # Latency objectives per priority class: the most a job of the class should wait for engine
    # time spent on other work. It waits for the call running when it arrives, then rides in a call
    # with others: while jobs of a class wait, or arrived in the last 2 s, a worker's call holds
    # only what its measured pace says ends within half the objective (at least one job); 0: no
    # bound, calls as full as the engine takes (docs/tenancy.md, "Engine calls").
    interactive_objective_s: float = Field(default=0.1, ge=0)
    default_objective_s: float = Field(default=1.0, ge=0)
    batch_objective_s: float = Field(default=0.0, ge=0)
    # Backpressure, per model queue: beyond these a request gets 429 with Retry-After.
    max_queued_requests: int = Field(default=1024, ge=1)
    max_queued_tokens: int = Field(default=2_000_000, ge=1)  # estimated: text bytes / 4, or token ids
    retry_after_s: int = Field(default=1, ge=1)
    # How long a request (or a queued job) waits for a model's worker to come back before a 503.
    worker_wait_s: float = Field(default=10.0, ge=0)
    max_inputs: int = Field(default=2048, ge=1)  # per request, as OpenAI
    # What one request may cost on any route: its inputs (Ollama's /api/embed, rerank's documents,
    # score's pairs, tokenize), and the values of the vectors it needs (inputs x the model's
    # dimensions: 2048 inputs of 4096 dimensions, as OpenAI allows; 21,845 of 384).
    max_request_inputs: int = Field(default=65536, ge=1)
    max_answer_values: int = Field(default=2**23, ge=1)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    # HTTP edges: slow or bloated clients are closed, healthy ones served.
    # Connections held at once; never more than the process's file limit leaves room for (see
    # server.py). Beyond, a new connection takes the place of the one that has waited longest
    # without sending a request; if every one is mid-request, the new one gets 503.
    max_connections: int = Field(default=4096, ge=16)
    head_timeout_s: float = Field(default=10.0, gt=0)  # to send a request's line and headers
    # A body may pause this long between bytes, and after its first body_timeout_s it must have
    # come at body_min_rate bytes/s on average (a slow drip is a stalled body too); 408 beyond.
    body_timeout_s: float = Field(default=10.0, gt=0)
    body_min_rate: int = Field(default=64 * 1024, ge=0)
    # Bytes of request bodies being received, across all connections: beyond, a body (past its
    # first 64 KiB) gets 503 with Retry-After, so that stalled uploads cannot take the memory.
    max_body_bytes_in_flight: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)
    max_headers: int = Field(default=100, ge=10)
    max_header_bytes: int = Field(default=65536, ge=1024)  # all header names and values together
    # Browsers: Host names answered besides loopback ones when bound to loopback ("*": any), and
    # origins whose pages may call the client API (CORS; "*": any).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    metrics_token: SecretStr | None = None  # if set, GET /metrics needs it as a bearer token
    # Where jobs and worker registrations live: "memory" (this process only) or "redis" (shared
    # by every replica that names the same Redis and prefix).
    queue: Literal["memory", "redis"] = "memory"
    redis_url: str = ""  # redis://host:6379/0 (rediss:// for TLS); the password is better in REDIS_PASSWORD
    redis_password: SecretStr | None = None
    redis_prefix: str = Field(default="embedq", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("worker_tokens", "admin_tokens", "allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def clients_open(self) -> bool:
        """Whether client endpoints accept anyone (no key store configured)."""
        return not (self.keys_db or self.keys_file or self.keys_redis)

    @property
    def objectives(self) -> tuple[float | None, ...]:
        """Per priority class (interactive, default, batch), its objective; None: no bound."""
        return tuple(o or None for o in (self.interactive_objective_s, self.default_objective_s, self.batch_objective_s))

    @property
    def queue_wait_s(self) -> float:
        return self.max_queue_wait_s or min(10.0, self.request_timeout_s / 2)

    @property
    def workers_open(self) -> bool:
        """Whether worker endpoints accept any caller (no worker token configured)."""
        return not self.worker_tokens


def _check_recovery_fits(settings: GatewaySettings) -> None:
    """A job whose worker dies or hangs is noticed after worker_ttl_s or its lease at the latest;
    the other half of the request's time is left for another worker to compute it."""
    half = settings.request_timeout_s / 2
    for name in ("worker_ttl_s", "lease_ttl_s"):
        value = getattr(settings, name)
        if value > half:
            raise SettingsError(
                f"{ENV_PREFIX}{name.upper()} ({value:g}s) must be at most half of {ENV_PREFIX}REQUEST_TIMEOUT_S "
                f"({settings.request_timeout_s:g}s): a job whose worker died or hung is noticed only after it, and "
                "another worker needs the rest of the request's time to compute it"
            )


def load_settings(environ: Mapping[str, str], **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        name: environ[ENV_PREFIX + name.upper()] for name in GatewaySettings.model_fields if ENV_PREFIX + name.upper() in environ
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = GatewaySettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']} (got {err['input']!r})" for err in exc.errors()
        )
        raise SettingsError(problems) from None
    _check_recovery_fits(settings)
    if sum(map(bool, (settings.keys_db, settings.keys_file, settings.keys_redis))) > 1:
        raise SettingsError("set one of EMBEDQ_KEYS_DB, EMBEDQ_KEYS_FILE and EMBEDQ_KEYS_REDIS, not more")
    if settings.keys_redis and settings.queue != "redis":
        raise SettingsError("EMBEDQ_KEYS_REDIS=true keeps the keys in the queue's Redis: it needs EMBEDQ_QUEUE=redis")
    if settings.queue == "redis" and not settings.redis_url:
        raise SettingsError("EMBEDQ_QUEUE=redis needs EMBEDQ_REDIS_URL (e.g. redis://redis:6379/0)")
    if settings.queue == "redis" and settings.keys_db:
        raise SettingsError(
            "EMBEDQ_KEYS_DB is one replica's SQLite file; with EMBEDQ_QUEUE=redis every replica must see the same "
            "keys: set EMBEDQ_KEYS_REDIS=true to keep them in Redis, or export them "
            "(python -m gateway keys export) and set EMBEDQ_KEYS_FILE to the shared file"
        )
    if settings.workers_open and not settings.loopback and not settings.allow_open_workers:
        raise SettingsError(
            f"bound to {settings.host} with no worker token: set EMBEDQ_WORKER_TOKENS "
            "(or EMBEDQ_ALLOW_OPEN_WORKERS=true on a trusted network)"
        )
    if settings.clients_open and not settings.loopback and not settings.allow_anonymous_clients:
        raise SettingsError(
            f"bound to {settings.host} with no API keys: set EMBEDQ_KEYS_DB, EMBEDQ_KEYS_FILE or EMBEDQ_KEYS_REDIS "
            "(or EMBEDQ_ALLOW_ANONYMOUS_CLIENTS=true to serve anyone, on a trusted network)"
        )
    return settings
