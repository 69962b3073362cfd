"""The fast tier's harness: the gateway app with its lifespan running, clients talking to it through
``httpx.ASGITransport``, and fake workers (the real runner on the fake engine) in this process,
talking to it the same way. No sockets, no processes."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from contract.frames import encode_results
from contract.messages import RESULTS_CONTENT_TYPE, SESSION_HEADER, JobResult, ResultsHeader
from gateway.app import create_app
from gateway.settings import load_settings
from tests.fakes import fake_worker_config
from worker.client import GatewayClient
from worker.config import parse_config
from worker.engines import FakeEngine
from worker.metrics import WorkerMetrics
from worker.runner import Worker

URL = "http://127.0.0.1:8080"  # a loopback name: the dev-mode gateway answers only those


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CuttableTransport(httpx.AsyncBaseTransport):
    """The app in process, as a network would carry it; ``cut()`` makes every later call fail as
    if the peer had vanished (a worker killed with -9 says nothing more)."""

    def __init__(self, app: Starlette):
        self._asgi = httpx.ASGITransport(app)
        self.cut_off = False

    def cut(self) -> None:
        self.cut_off = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut_off:
            raise httpx.ConnectError("cut off", request=request)
        return await self._asgi.handle_async_request(request)


@dataclass
class FakeWorker:
    """A real ``Worker`` on the fake engine, serving the app in process."""

    worker: Worker
    engine: FakeEngine
    transport: CuttableTransport
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    @property
    def id(self) -> str:
        return self.worker.worker_id

    async def kill(self) -> None:
        """Gone without a word: no leave, no give-back, no more heartbeats."""
        self.transport.cut()
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


class Gateway:
    """The app, started; ``client`` speaks to it; ``worker()`` starts fake workers against it."""

    def __init__(self, app: Starlette):
        self.app = app
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=URL, timeout=30)
        self.workers: list[FakeWorker] = []

    async def worker(self, model: str = "fake-model", token: str = "", **options) -> FakeWorker:
        config = parse_config(fake_worker_config(URL, model, token=token, **options))
        engine = FakeEngine(config.generator)  # type: ignore[arg-type]  # fake_worker_config makes a fake one
        metrics = WorkerMetrics(CollectorRegistry())
        transport = CuttableTransport(self.app)
        queue = config.queue
        client = GatewayClient(URL, token, queue.http_request_retries, queue.http_timeout_s, metrics, transport=transport)
        fake = FakeWorker(Worker(config, engine, client, metrics), engine, transport)
        fake.task = asyncio.create_task(fake.worker.run(fake.stop))
        self.workers.append(fake)
        await self.until(lambda: self.app.state.workers.live_count() >= len(self.workers), f"worker for {model} registered")
        return fake

    async def embed(self, texts: list[str] | str, model: str = "fake-model", **fields) -> httpx.Response:
        return await self.client.post("/v1/embeddings", json={"model": model, "input": texts, **fields})

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    @staticmethod
    async def until(predicate, what: str, timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for fake in self.workers:
            fake.stop.set()
            fake.engine.close()  # a hung engine's thread ends, or the loop could not shut down
        for fake in self.workers:
            if fake.task is not None and not fake.task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(fake.task, 5)
        await self.client.aclose()


class HandWorker:
    """A worker that speaks the protocol by hand, and says whatever a test wants it to."""

    def __init__(self, gateway: Gateway, worker_id: str = "hand", checkpoint: str = "fake-model", dims: int = 16,
                 model: str = "fake-model", session: str | None = None):  # fmt: skip
        self.gateway, self.id, self.checkpoint, self.dims, self.model = gateway, worker_id, checkpoint, dims, model
        self.session = session or secrets.token_hex(16)

    async def call(self, path: str, **kwargs):
        headers = {SESSION_HEADER: self.session, **kwargs.pop("headers", {})}
        return await self.gateway.client.post("/internal/v1" + path, headers=headers, **kwargs)

    async def register(self, **card):
        hello = {"worker_id": self.id, "checkpoint_name": self.checkpoint, "max_batch_items": 64,
                 "models": {self.model: {"max_input_tokens": 64, "dimensions": self.dims, **card}}}  # fmt: skip
        return await self.call("/workers/heartbeat", json=hello)

    async def lease(self, wait_s: float = 5, hold_s: float = 1.0):
        request = {"worker_id": self.id, "max_items": 64, "wait_s": wait_s, "hold_s": hold_s}
        response = await self.call("/lease", json=request)
        assert response.status_code == 200, response.text
        return response.json()["jobs"]

    async def post(self, answers: list[tuple[dict, np.ndarray, list[int]]], worker_id: str | None = None):
        results = [JobResult(job_id=job["job_id"], lease_id=job["lease_id"], rows=m.shape[0], dims=m.shape[1],
                             prompt_tokens=tokens) for job, m, tokens in answers]  # fmt: skip
        frame = encode_results(ResultsHeader(worker_id=worker_id or self.id, results=results), [m for _, m, _ in answers])
        return await self.call("/results", content=frame, headers={"Content-Type": RESULTS_CONTENT_TYPE})


@contextlib.asynccontextmanager
async def running(env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    """A gateway app on the given EMBEDQ_* settings (the defaults otherwise, but for a data
    directory of its own: a gateway of ``make run`` beside the tests holds the default one),
    lifespan and all."""
    with tempfile.TemporaryDirectory(prefix="embedq-data-") as data_dir:
        app = create_app(load_settings({"EMBEDQ_DATA_DIR": data_dir, **(env or {})}))
        async with app.router.lifespan_context(app):
            gateway = Gateway(app)
            try:
                yield gateway
            finally:
                await gateway.close()
