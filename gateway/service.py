"""A request without its dialect: route it to a model's queue, split it into jobs, admit them,
wait, put the answers together. Every capability (embed, score, tokenize, detokenize) runs its
jobs through ``_run``, the one place where a request's jobs meet the queue.

Requests are split into jobs of at most ``job_max_inputs`` inputs and ``job_max_tokens`` tokens,
so that several workers share a large request and a lease can bound an engine call finely;
workers batch jobs from many requests together. A failed job fails its request with
the error translated back to the request's own input index.

Before a request's jobs are queued: its key's limits (``tenancy/limits.py``: 429
``rate_limit_exceeded`` or ``insufficient_quota``, with Retry-After and OpenAI's rate-limit
headers), then its model's queue: bounded by requests and by (estimated) tokens, and by time: a
request predicted to wait longer than ``max_queue_wait_s`` is refused at once
(``admission.py``). Its jobs go in line by its priority class and its key's fair share
(``Placement``). A model whose workers all went away gets ``worker_wait_s`` for one to come
back, for new requests and queued jobs alike, then a 503.

Prompts: a model names prompts in its sentence-transformers config or its worker's config.toml
(``query = "query: "``); a request picks one by ``prompt_name`` (TEI's field: that prompt, or a
400) or ``input_type`` (Cohere's and vLLM's: the prompt of that name, else ``search_query`` means
``query``, ``search_document`` and ``passage`` mean ``document``; a model with neither embeds the
text as it is). A request that names none gets the model's default prompt, if it has one, as
sentence-transformers gives it. The prompt goes before each text, and its tokens count.

Vectors are what the model's own modules make of a text, as sentence-transformers' ``encode``
gives them: unit-length where the model ends in ``Normalize`` (``ModelCard.normalized``), as they
come where it does not. A cut to a smaller size is re-normalised only where the vectors were
unit-length; a score of two vectors is their cosine, whatever their lengths.

Longer than most modules on purpose: everything between a parsed request and its queue is here,
in the order it happens, so that no path of a request can skip a limit, a bound or a count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from contract.messages import JobInput, JobKind, Task
from gateway.admission import QueueLoad
from gateway.auth import Auth
from gateway.errors import (
    ApiError,
    EngineFailed,
    GatewayTimeout,
    InvalidRequest,
    NoLiveWorker,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
)
from gateway.metrics import GatewayMetrics
from gateway.queue import DEFAULT, JobDone, JobFailed, JobFailure, JobQueue, JobSpec, Placement, QueueTimeout, QueueUnavailable
from gateway.registry import Route, WorkerRegistry
from gateway.settings import GatewaySettings
from gateway.tenancy import calls
from gateway.tenancy.keys import ApiKey
from gateway.tenancy.limits import Decision, Limiter, Limits
from gateway.vectors import CALIBRATED, Calibrations, Kept, cut_to, l2_normalize, quantize

log = logging.getLogger(__name__)
WORKER_POLL_S = 0.25
INPUT_TYPES = {
    "search_query": "query",
    "search_document": "document",
    "passage": "document",
}  # an alias a model's prompt may go by
INPUT_TYPE_NAMES = ("query", "document", "classification", "clustering")  # input_types any model takes


@dataclass(frozen=True)
class Embeddings:
    model: str
    vectors: np.ndarray  # (n, dims) float32: L2-normalised rows if the model normalises (the module's docstring)
    prompt_tokens: int
    normalized: bool = True


@dataclass(frozen=True)
class Scores:
    model: str
    scores: list[float]  # one per pair
    prompt_tokens: int


@dataclass(frozen=True)
class Tokens:
    model: str
    token_ids: list[list[int]]
    max_input_tokens: int


def serves(route: Route) -> list[str]:
    """What a client may ask of the model: a cross-encoder scores; an embedding model also scores
    and reranks, by the cosine of its embeddings; a SPLADE model gives sparse weights (it embeds,
    in the worker's words, a vector of the vocabulary's size); every model tokenizes."""
    tasks: set[str] = set(route.card.tasks)
    if "embed" in tasks:
        tasks.add("score")
    return sorted(tasks)


class Service:
    def __init__(
        self, settings: GatewaySettings, queue: JobQueue, workers: WorkerRegistry, metrics: GatewayMetrics, limiter: Limiter,
        kept: Kept,
    ):  # fmt: skip
        self._settings = settings
        self._queue = queue
        self._workers = workers
        self._metrics = metrics
        self._limiter = limiter
        self._load: dict[str, QueueLoad] = {}  # per queue key: admitted, not yet answered
        self._background: set[asyncio.Task] = set()
        self._calibrations = Calibrations(self._calibration_vectors, kept)

    async def route(self, model: str, key: ApiKey | None, tags: frozenset[str] = frozenset(), task: Task = "embed") -> Route:
        """Where ``model``'s jobs go for ``key`` (None: anonymous), waiting up to worker_wait_s for
        a worker that went away; 400 if the model does not do ``task``."""
        Auth.check_model(key, model)  # before resolving: a key out of scope learns nothing of the model
        visible = key.allows if key is not None else bool  # an unknown name lists only the key's models
        deadline = time.monotonic() + self._settings.worker_wait_s
        while True:
            try:
                route = await self._workers.resolve(model, tags, visible)
                break
            except NoLiveWorker as exc:
                if time.monotonic() >= deadline:
                    exc.headers["Retry-After"] = str(self._settings.retry_after_s)
                    raise
            await asyncio.sleep(WORKER_POLL_S)
        if task not in serves(route):
            raise InvalidRequest(
                f"model {model!r} does not {task}: it serves {', '.join(serves(route))}", param="model", code="unsupported_task"
            )
        return route

    async def sole_model(self, task: Task, key: ApiKey | None) -> str:
        """The model a request that names none means (TEI's clients name none: TEI serves one):
        the one model that does ``task`` for ``key``, waiting up to worker_wait_s for one to come
        back; 400 where several do."""
        deadline = time.monotonic() + self._settings.worker_wait_s
        while True:
            routes = self._workers.routes()
            names = sorted(n for n, r in routes.items() if task in serves(r) and (key is None or key.allows(n)))
            if len(names) == 1:
                return names[0]
            if names:
                raise InvalidRequest(f"'model' is needed where several models do {task}: {', '.join(names)}",
                                     param="model", code="missing_field")  # fmt: skip
            if time.monotonic() >= deadline:
                raise NoLiveWorker(f"no model that does {task} has a live worker right now; try again later", param="model",
                                   headers={"Retry-After": str(self._settings.retry_after_s)})  # fmt: skip
            await asyncio.sleep(WORKER_POLL_S)

    # -- what clients ask for ----------------------------------------------------------------

    async def embed(
        self,
        route: Route,
        inputs: list[JobInput],
        *,
        single: bool,
        key: ApiKey | None,
        dimensions: int | None = None,
        truncate: bool | None = None,
        prompt_name: str | None = None,
        input_type: str | None = None,
        tags: frozenset[str] = frozenset(),
    ) -> Embeddings:
        """Embed ``inputs``; ``truncate=None``: not said (a chunking model chunks, else the model's
        default); ``prompt_name``, ``input_type``: which prompt (see the module's docstring)."""
        check_dimensions(route, dimensions)
        cut = route.card.truncate if truncate is None and not route.card.chunked else bool(truncate)
        if not cut and not route.card.chunked:
            _check_context(route, inputs)
        inputs = with_prompt(route, inputs, prompt_name=prompt_name, input_type=input_type)
        done = await self._run(route, "embed", inputs, key, single=single, truncate=cut, tags=tags)
        vectors = done[0].vectors if len(done) == 1 else np.concatenate([d.vectors for d in done])
        normalized = route.card.normalized
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = cut_to(vectors, dimensions, normalized)  # Matryoshka: a prefix is an embedding
        return Embeddings(route.model, vectors, _tokens(done), normalized)

    async def quantized(self, route: Route, vectors: np.ndarray, dtype: str) -> np.ndarray:
        """``embed``'s vectors (at any size the model has) as ``dtype`` (``vectors.py``): int8 and
        uint8 by the model's ranges, calibrated the first time they are asked for."""
        return quantize(vectors, dtype, await self.ranges(route, vectors.shape[1]) if dtype in CALIBRATED else None)

    async def ranges(self, route: Route, dimensions: int) -> np.ndarray:
        """The model's int8 ranges at ``dimensions`` (one it supports): (2, dimensions), low and high."""
        return await self._calibrations.ranges(route, dimensions)

    async def _calibration_vectors(self, route: Route, texts: list[str]) -> np.ndarray:
        """The calibration corpus's vectors, in requests of a job each (whatever the request bounds)."""
        size, inputs = self._settings.job_max_inputs, list[JobInput](texts)
        parts = [self.embed(route, inputs[i : i + size], single=False, key=None, truncate=True)
                 for i in range(0, len(inputs), size)]  # fmt: skip
        return np.concatenate([done.vectors for done in await asyncio.gather(*parts)])

    async def score(
        self,
        route: Route,
        first: Sequence[str],
        second: Sequence[str],
        *,
        key: ApiKey | None,
        names: tuple[str, str] = ("text_1", "text_2"),
        truncate: bool = True,
    ) -> Scores:
        """A score per pair (first[i], second[i]): a cross-encoder's own, or the cosine of an
        embedding model's vectors (the first texts with its "query" prompt, the second with its
        "document" prompt, where it has them; each distinct text embedded once). An error names
        the text by the request's own fields (``names``)."""
        if "score" in route.card.tasks:
            try:
                done = await self._run(route, "score", list(first), key, single=False, truncate=truncate,
                                       pairs_with=list(second))  # fmt: skip
            except InvalidRequest as exc:
                raise renamed(exc, lambda i: f"{names[0]}[{i}] + {names[1]}[{i}]") from None
            return Scores(route.model, [float(row[0]) for d in done for row in d.vectors], _tokens(done))
        queries, documents = list(dict.fromkeys(first)), list(dict.fromkeys(second))
        inputs = with_prompt(route, list(queries), input_type="search_query") + with_prompt(
            route, list(documents), input_type="search_document"
        )
        try:
            done = await self._run(route, "embed", inputs, key, single=False, truncate=truncate)
        except InvalidRequest as exc:
            raise renamed(exc, lambda i: f"{names[0]}[{i}]" if i < len(queries) else f"{names[1]}[{i - len(queries)}]") from None
        vectors = l2_normalize(np.concatenate([d.vectors for d in done]))  # a cosine, whatever the model's lengths
        query_row = {text: i for i, text in enumerate(queries)}
        document_row = {text: len(queries) + i for i, text in enumerate(documents)}
        cosines = [float(vectors[query_row[a]] @ vectors[document_row[b]]) for a, b in zip(first, second)]
        return Scores(route.model, cosines, _tokens(done))

    async def tokenize(
        self, route: Route, texts: list[str], *, key: ApiKey | None, special_tokens: bool = True,
        prompt_name: str | None = None,
    ) -> Tokens:  # fmt: skip
        inputs = with_prompt(route, list(texts), prompt_name=prompt_name)
        done = await self._run(route, "tokenize", inputs, key, single=len(inputs) == 1, special_tokens=special_tokens)
        return Tokens(route.model, [ids for d in done for ids in d.token_ids or []], route.card.max_input_tokens)

    async def detokenize(self, route: Route, ids: list[list[int]], *, key: ApiKey | None) -> list[str]:
        done = await self._run(route, "detokenize", list(ids), key, single=len(ids) == 1)
        return [text for d in done for text in d.texts or []]

    # -- the one way jobs go ------------------------------------------------------------------

    async def _run(
        self,
        route: Route,
        kind: JobKind,
        inputs: list[JobInput],
        key: ApiKey | None,
        *,
        single: bool,
        truncate: bool = False,
        tags: frozenset[str] = frozenset(),
        pairs_with: list[str] | None = None,
        special_tokens: bool = True,
    ) -> list[JobDone]:
        width = {"embed": route.card.dimensions, "score": 1}.get(kind, 0)
        self._bound(route, inputs, width)
        spans = job_spans(inputs, pairs_with, self._settings.job_max_inputs, self._settings.job_max_tokens)
        specs = [
            JobSpec(
                route.model, inputs[start:end], truncate, tags, tokens, kind, width, (pairs_with or [])[start:end], special_tokens
            )  # fmt: skip
            for start, end, tokens in spans
        ]
        self._metrics.request_inputs.observe(len(inputs))
        call = calls.current()
        if call is not None:
            call.model = route.model
        placement = Placement(
            call.priority if call is not None else DEFAULT,
            key.name if key is not None else "",
            key.limits.weight if key is not None else 1.0,
        )
        tokens = sum(spec.tokens for spec in specs)
        decision = await self._limit(key, tokens, call)
        done: list[JobDone] = []
        try:
            with self._admitted(route, tokens, placement):
                done = await self._queue.run(route.checkpoint, specs, self._settings.request_timeout_s, placement)
        except asyncio.CancelledError:
            self._metrics.jobs.labels("client_gone").inc(len(specs))
            raise
        except QueueTimeout:
            self._metrics.jobs.labels("timeout").inc(len(specs))
            raise GatewayTimeout(f"model {route.model!r} did not answer within {self._settings.request_timeout_s:g}s") from None
        except JobFailure as failure:
            self._metrics.jobs.labels(failure.failure.code).inc()
            raise _client_error(failure, spans[failure.job_index][0], single, self._settings.retry_after_s) from None
        finally:
            if decision is not None:
                self._finish(key, call, decision, _tokens(done))
        self._count_served(route.model, key, jobs=len(specs), inputs=len(inputs), tokens=_tokens(done))
        if call is not None:
            call.inputs += len(inputs)
            call.tokens += _tokens(done)
        return done

    def _bound(self, route: Route, inputs: list[JobInput], width: int) -> None:
        """What one request may cost, whatever its route (``EMBEDQ_MAX_REQUEST_INPUTS``, and
        ``EMBEDQ_MAX_ANSWER_VALUES`` of the vectors it needs, a rerank's by cosine too): 413."""
        settings = self._settings
        if len(inputs) > settings.max_request_inputs:
            raise PayloadTooLarge(f"this request has {len(inputs)} inputs; a request may have at most "
                                  f"{settings.max_request_inputs} (EMBEDQ_MAX_REQUEST_INPUTS): split it")  # fmt: skip
        if len(inputs) * width > settings.max_answer_values:
            most = settings.max_answer_values // width
            raise PayloadTooLarge(
                f"{len(inputs)} inputs of model {route.model!r} ({width} dimensions) need {len(inputs) * width} values; a "
                f"request may need at most {settings.max_answer_values} (EMBEDQ_MAX_ANSWER_VALUES), {most} inputs of this "
                "model: split it"
            )

    async def _limit(self, key: ApiKey | None, tokens: int, call: calls.Call | None) -> Decision | None:
        """The key's limits on a request of ``tokens`` (estimated): 429 over one of them."""
        limits = _limits(key, call) if key is not None else None
        if key is None or limits is None or not limits.enforced:
            return None
        decision = await self._limiter.admit(key.name, limits, tokens)
        headers = calls.rate_headers(decision, key)
        if call is not None:
            call.headers = headers
        if decision.refused is None:
            return decision
        wait = max(1, math.ceil(decision.retry_after_s))
        refusal = {**headers, "Retry-After": str(wait), "retry-after-ms": str(max(1, round(decision.retry_after_s * 1000)))}
        if decision.refused == "budget":
            raise QuotaExceeded(
                f"API key {key.name!r} has spent its budget of {limits.budget} tokens per {limits.budget_period}; "
                f"it renews in {calls.duration(decision.retry_after_s)}",
                headers={**refusal, "x-should-retry": "false"},
            )
        what = {
            "rpm": f"requests per minute ({limits.rpm})",
            "tpm": f"tokens per minute ({limits.tpm}; this request ~{tokens})",
            "concurrency": f"requests at once ({limits.concurrency})",
            "too_large": f"tokens per minute ({limits.tpm}): this request alone has ~{tokens}",
        }[decision.refused]
        if decision.refused == "too_large":
            refusal["x-should-retry"] = "false"
        raise RateLimited(
            f"API key {key.name!r} is over its limit of {what}; retry after {calls.duration(decision.retry_after_s)}",
            headers=refusal,
        )

    def _finish(self, key: ApiKey | None, call: calls.Call | None, decision: Decision, used: int) -> None:
        """Tell the limiter a request ended (in the background: the client need not wait)."""
        assert key is not None
        task = asyncio.get_running_loop().create_task(self._limiter.finish(key.name, _limits(key, call), decision, used))
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record the end of a limited request: %s", task.exception())

    def _count_served(self, model: str, key: ApiKey | None, *, jobs: int, inputs: int, tokens: int) -> None:
        metrics = self._metrics
        metrics.child(metrics.jobs, "ok").inc(jobs)
        metrics.child(metrics.inputs, model).inc(inputs)
        metrics.child(metrics.tokens, model).inc(tokens)
        if key is not None:
            metrics.child(metrics.key_requests, key.name).inc()
            metrics.child(metrics.key_tokens, key.name).inc(tokens)

    @contextmanager
    def _admitted(self, route: Route, tokens: int, placement: Placement) -> Iterator[None]:
        load = self._load.setdefault(route.checkpoint, QueueLoad())
        settings = self._settings
        now = time.monotonic()
        # Counted: the requests of its class and more urgent ones (bulk never takes an urgent one's room).
        # A single request larger than the token bound is let in alone, or it could never run.
        requests, queued = load.at_or_above(placement.priority)
        if requests >= settings.max_queued_requests or (requests and queued + tokens > settings.max_queued_tokens):
            self._metrics.rejected.labels(route.model).inc()
            raise Overloaded(
                f"model {route.model!r} is at capacity ({requests} requests, ~{queued} tokens queued); "
                f"retry after {settings.retry_after_s}s",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        predicted = load.predicted_s(placement, tokens, now, self._queue.speed(route.checkpoint))
        if predicted is not None and predicted[0] > settings.queue_wait_s:
            wait = predicted[0]
            self._metrics.rejected.labels(route.model).inc()
            retry = max(settings.retry_after_s, math.ceil(wait - settings.queue_wait_s))
            raise Overloaded(
                f"model {route.model!r} is busy: this request would wait ~{wait:.0f}s in line for others' work (at "
                f"most {settings.queue_wait_s:g}s are allowed); retry after {retry}s",
                headers={"Retry-After": str(retry)},
            )
        load.enter(placement, tokens, now)
        answered = False
        try:
            yield
            answered = True
        finally:
            load.leave(placement, tokens, time.monotonic(), answered)

    async def fail_orphans_forever(self, period_s: float = 1.0) -> None:
        """Fail the queued jobs of a checkpoint that had no live worker for worker_wait_s."""
        orphaned_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(period_s)
            live, now = self._workers.live_checkpoints(), time.monotonic()
            for key, stats in self._queue.stats().items():
                if key in live or not stats.depth:
                    orphaned_since.pop(key, None)
                    continue
                since = orphaned_since.setdefault(key, now)
                if now - since >= self._settings.worker_wait_s:
                    message = f"no live worker for {key!r} came back within {self._settings.worker_wait_s:g}s"
                    try:
                        count = await self._queue.abandon(key, JobFailed("no_live_worker", message))
                    except QueueUnavailable:
                        continue  # next round
                    log.warning("failed %d queued jobs: %s", count, message)
                    orphaned_since.pop(key)


def with_prompt(
    route: Route, inputs: list[JobInput], *, prompt_name: str | None = None, input_type: str | None = None
) -> list[JobInput]:
    """The inputs with the prompt the request picks before each text (the module's docstring)."""
    prompt = _picked_prompt(route, prompt_name, input_type)
    if prompt is None and prompt_name is None and input_type is None and route.card.default_prompt:
        if any(not isinstance(item, str) for item in inputs):
            return inputs  # token ids are the client's own: no prompt goes before them unasked
        prompt = route.card.prompts[route.card.default_prompt]
    if prompt is None:
        return inputs
    if any(not isinstance(item, str) for item in inputs):
        raise InvalidRequest("a prompt applies to texts, not to token ids", param="input", code="invalid_value")
    return [prompt + str(item) for item in inputs]


def _picked_prompt(route: Route, prompt_name: str | None, input_type: str | None) -> str | None:
    """The prompt a request names, None if it names none (or an input_type the model has none
    for); a 400 for a prompt_name the model lacks, or an input_type no model knows."""
    prompts = route.card.prompts
    known = ", ".join(sorted(prompts)) or "none"
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise InvalidRequest(
                f"model {route.model!r} has no prompt {prompt_name!r} (its prompts: {known})", param="prompt_name"
            )
        return prompts[prompt_name]
    if input_type is None:
        return None
    prompt = prompts.get(input_type, prompts.get(INPUT_TYPES.get(input_type, "")))
    if prompt is None and input_type not in INPUT_TYPES and input_type not in INPUT_TYPE_NAMES:
        raise InvalidRequest(f"model {route.model!r} has no prompt for input_type {input_type!r} (its prompts: {known})",
                             param="input_type")  # fmt: skip
    return prompt


def renamed(exc: InvalidRequest, name: Callable[[int], str], fields: dict[str, str] | None = None) -> InvalidRequest:
    """The error of input[i] (``name(i)``), or of one of ``fields`` (OpenAI's name -> the
    request's), in the words of a request whose fields are named otherwise (a scoring's, Cohere's)."""
    match = re.fullmatch(r"input\[(\d+)\]", exc.param or "")
    where = name(int(match.group(1))) if match else (fields or {}).get(exc.param or "")
    if where is None:
        return exc
    return InvalidRequest(exc.message.replace(f"'{exc.param}'", f"'{where}'"), param=where, code=exc.code)


def _limits(key: ApiKey, call: calls.Call | None) -> Limits:
    """The key's limits on this call: a batch's line is held to its budget only."""
    return key.limits.for_batch() if call is not None and call.source == "batch" else key.limits


def _tokens(done: list[JobDone]) -> int:
    return sum(sum(d.prompt_tokens) for d in done)


def job_spans(
    inputs: Sequence[JobInput], pairs_with: Sequence[str] | None, max_inputs: int, max_tokens: int
) -> list[tuple[int, int, int]]:
    """Where a request is cut into jobs, as (start, end, estimated tokens): at most ``max_inputs``
    inputs and ``max_tokens`` tokens a job, an input larger than that alone. Small jobs are what
    lets a lease bound an engine call to an objective, and several workers share a large request."""
    spans, start, tokens = [], 0, 0
    for i, item in enumerate(inputs):
        cost = _estimate(item) + (_estimate(pairs_with[i]) if pairs_with else 0)
        if i > start and (i - start >= max_inputs or tokens + cost > max_tokens):
            spans.append((start, i, tokens))
            start, tokens = i, 0
        tokens += cost
    spans.append((start, len(inputs), tokens))
    return spans


def _estimate(item: JobInput) -> int:
    """An input's tokens, about: text bytes / 4 (and its special tokens), or its token ids."""
    return len(item) // 4 + 2 if isinstance(item, str) else len(item)


def _check_context(route: Route, inputs: list[JobInput]) -> None:
    """Token-id inputs longer than the model takes are refused here, before any job is built (texts
    are counted by the worker, which holds the tokenizer)."""
    limit = route.card.max_input_tokens
    for i, item in enumerate(inputs):
        if isinstance(item, list) and len(item) > limit:
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            raise InvalidRequest(
                f"'{where}' has {len(item)} tokens; model {route.model!r} accepts at most {limit} "
                "(send truncate: true to cut it)",
                param=where,
                code="context_length_exceeded",
            )


def check_dimensions(route: Route, dimensions: int | None) -> None:
    card = route.card
    if dimensions is None or dimensions == card.dimensions or dimensions in card.matryoshka_dimensions:
        return
    if card.matryoshka_dimensions:
        allowed = ", ".join(map(str, sorted([*card.matryoshka_dimensions, card.dimensions])))
        message = f"model {route.model!r} supports 'dimensions' of {allowed} (got {dimensions})"
    else:
        message = (
            f"model {route.model!r} returns {card.dimensions}-dimensional vectors and is not a Matryoshka "
            f"model: 'dimensions' must be omitted or {card.dimensions} (got {dimensions})"
        )
    raise InvalidRequest(message, param="dimensions", code="unsupported_dimensions")


def _client_error(failure: JobFailure, job_start: int, single: bool, retry_after_s: int) -> ApiError:
    failed = failure.failure
    where = "input"
    if failed.input_index is not None and not single:
        where = f"input[{job_start + failed.input_index}]"
    if failed.code == "input_too_long":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="context_length_exceeded")
    if failed.code == "invalid_input":
        return InvalidRequest(f"'{where}' {failed.message.removeprefix('input ')}", param=where, code="invalid_value")
    if failed.code in ("attempts_exhausted", "no_live_worker"):
        return NoLiveWorker(failed.message, code=failed.code, headers={"Retry-After": str(retry_after_s)})
    return EngineFailed(f"the engine failed on '{where}'", param=where)
