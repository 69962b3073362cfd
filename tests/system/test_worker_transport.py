"""The worker's HTTP: httpx on aiohttp (worker/transport.py), and GatewayClient's retries over it.

Every failure must reach the caller as the httpx error httpx's own transport would raise (a
TransportError: retried, then handled by the worker loop); anything else would crash a worker.
Each case runs a raw asyncio server on a loopback port that misbehaves in one way.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contract.messages import JobRef, LeaseRequest, Release
from worker.client import GatewayClient
from worker.metrics import WorkerMetrics
from worker.transport import AiohttpTransport

pytestmark = pytest.mark.anyio
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(closing, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return head, await reader.readexactly(length)


async def _requests(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, bytes]]:
    """The requests on one kept-alive connection, until the client closes it."""
    while True:
        try:
            yield await _read_request(reader)
        except asyncio.IncompleteReadError:
            return


def _answer(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _post(url: str, timeout: float = 5.0, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(transport=AiohttpTransport(), timeout=timeout) as client:
        return await client.post(url + "/internal/v1/lease", **kwargs)


async def test_a_round_trip_carries_method_headers_and_both_bodies():
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader, writer):
        async for request in _requests(reader):  # one connection, several requests: kept alive
            seen.append(request)
            writer.write(_answer("201 Created", b'{"ok": true}', "Content-Type: application/json", "X-Extra: 1"))
            await writer.drain()

    server, url = await _serve(handler)
    async with server, httpx.AsyncClient(transport=AiohttpTransport(), headers={"Authorization": "Bearer t0k"}) as client:
        first = await client.post(
            url + "/internal/v1/results", content=b"\x00\x01frame", headers={"Content-Type": "application/x-embedq-results"}
        )
        second = await client.post(url + "/internal/v1/lease", json={"worker_id": "w"})
    assert (first.status_code, first.reason_phrase, first.json()) == (201, "Created", {"ok": True})
    assert first.headers["x-extra"] == "1" and second.status_code == 201
    head, body = seen[0]
    assert head.startswith(b"POST /internal/v1/results HTTP/1.1\r\n")
    assert b"\r\nauthorization: bearer t0k\r\n" in head.lower()
    assert b"application/x-embedq-results" in head and body == b"\x00\x01frame"
    assert json.loads(seen[1][1]) == {"worker_id": "w"}
    assert len(seen) == 2


async def test_a_compressed_answer_is_decoded_by_httpx():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(_answer("200 OK", gzip.compress(b'{"jobs": []}'), "Content-Encoding: gzip"))
        await writer.drain()

    server, url = await _serve(handler)
    async with server:
        response = await _post(url, json={})
    assert response.json() == {"jobs": []}


async def test_nobody_listening_is_a_connect_error():
    async def handler(reader, writer):
        pass

    server, url = await _serve(handler)
    server.close()
    await server.wait_closed()  # the port is free again: connections are refused
    with pytest.raises(httpx.ConnectError):
        await _post(url, json={})


async def test_an_answer_that_never_comes_is_a_read_timeout():
    done = asyncio.Event()

    async def handler(reader, writer):
        await _read_request(reader)
        await done.wait()  # holds the connection, says nothing

    server, url = await _serve(handler)
    async with server:
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.ReadTimeout):
            await _post(url, timeout=0.3, json={})
        assert asyncio.get_running_loop().time() - started < 2
        done.set()


@pytest.mark.parametrize(
    "reply",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", b"not http at all\r\n\r\n"],
    ids=["hang-up", "cut-body", "garbage"],
)
async def test_a_broken_answer_is_a_transport_error(reply: bytes):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(reply)
        await writer.drain()

    server, url = await _serve(handler)
    async with server:
        with pytest.raises(httpx.TransportError):
            await _post(url, json={})


async def test_the_gateway_client_retries_503_and_a_dropped_connection_then_succeeds():
    replies = iter([_answer("503 Service Unavailable", b"{}"), b"", _answer("200 OK", b'{"accepted": 1, "ignored": 0}')])

    async def handler(reader, writer):
        async for _ in _requests(reader):
            reply = next(replies)
            writer.write(reply)
            await writer.drain()
            if not reply:  # hang up instead of answering
                break

    server, url = await _serve(handler)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    client = GatewayClient(url, "t0k", retries=3, timeout_s=2.0, metrics=metrics)
    async with server:
        try:
            reply = await client.release(Release(worker_id="w", jobs=[JobRef(job_id="j", lease_id="l")]))
        finally:
            await client.aclose()
    assert reply.ignored == 0
    assert registry.get_sample_value("embedq_worker_http_retries_total") == 2


async def test_a_stopping_worker_retries_no_failed_lease():
    """Gateway and workers stopped together: the worker must not spend its drain time retrying a
    lease whose jobs it could only give back. Seven retries would take over 20 s of backoff."""
    attempts = 0

    async def handler(reader, writer):
        nonlocal attempts
        async for _ in _requests(reader):
            attempts += 1
            writer.write(_answer("503 Service Unavailable", b"{}"))
            await writer.drain()

    server, url = await _serve(handler)
    client = GatewayClient(url, "", retries=7, timeout_s=2.0, metrics=WorkerMetrics(CollectorRegistry()))
    stopping = asyncio.Event()
    request = LeaseRequest(worker_id="w", max_items=1, wait_s=0)
    asyncio.get_running_loop().call_later(0.1, stopping.set)  # during the first backoff (0.2 s or more)
    started = asyncio.get_running_loop().time()
    async with server:
        try:
            with pytest.raises(httpx.HTTPStatusError):
                await client.lease(request, stopping)
        finally:
            await client.aclose()
    assert asyncio.get_running_loop().time() - started < 2.0
    assert attempts <= 2  # the first, and at most the one its backoff was cut short for
