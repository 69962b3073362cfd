"""The edges of HTTP against a real gateway process, with plain sockets: slow clients, bloated
heads, huge bodies, too many connections. Healthy clients are served all along."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import orjson
import pytest

from tests.system.conftest import Cluster, Gateway, fake_worker_config

pytestmark = pytest.mark.timeout(120)


def _connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=30)


def _answer(conn: socket.socket, timeout_s: float = 30) -> bytes:
    """What the server sends until it closes the connection (or timeout_s); then ours is closed too."""
    conn.settimeout(timeout_s)
    chunks = []
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        conn.close()
    return b"".join(chunks)


@pytest.fixture
def served(cluster: Cluster) -> Gateway:
    gateway = cluster.gateway(defaults=True)
    cluster.worker(fake_worker_config(gateway.url))
    gateway.wait_for_model("fake-model")
    return gateway


def test_slow_clients_are_closed_after_the_head_timeout_and_healthy_ones_served(served: Gateway):
    """300 connections that send half a request's head and stall (slowloris), on default settings."""
    slow = [_connect(served) for _ in range(300)]
    for conn in slow:
        conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stalling: ")
    started = time.monotonic()
    served_meanwhile = 0
    while time.monotonic() - started < 5:
        response = httpx.post(served.url + "/v1/embeddings", json={"model": "fake-model", "input": "healthy"}, timeout=5)
        served_meanwhile += response.status_code == 200
    answers = [_answer(conn, timeout_s=15) for conn in slow]
    waited = time.monotonic() - started
    closed = sum(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    summary = f"{closed} of 300 slow connections answered 408 and closed after {waited:.1f}s; {served_meanwhile} healthy served"
    assert closed == 300 and served_meanwhile >= 10, summary
    assert waited < 10 + 8, summary  # the 10 s head timeout, then a few seconds for 300 closes


@pytest.mark.parametrize(
    "head",
    [
        b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)),  # 100,000 headers
        b"X-Big: " + b"v" * (64 * 1024 * 1024) + b"\r\n",  # one 64 MiB value
    ],
    ids=["100k-headers", "64MiB-value"],
)
def test_a_bloated_head_is_refused_with_431_without_reading_it_all(served: Gateway, head: bytes):
    conn = _connect(served)
    started = time.monotonic()
    sender = threading.Thread(target=_send_quietly, args=(conn, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n"))
    sender.start()
    answer = _answer(conn)
    sender.join()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert time.monotonic() - started < 5
    assert httpx.get(served.url + "/health").status_code == 200


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass  # the server closed on us: that is the point


def test_a_huge_body_of_token_ids_does_not_stall_other_requests(served: Gateway):
    """16 MB of token ids (8.4 M of them): parsed and checked off the event loop; /health answers
    promptly meanwhile, and the request gets a clear 400 (4,090 ids an input, for a 64-token model)."""
    body = orjson.dumps({"model": "fake-model", "input": [[1] * 4090] * 2048})  # 8.4 M ids, just under 16 MiB
    result: dict = {}

    def big() -> None:
        started = time.monotonic()
        result["response"] = httpx.post(served.url + "/v1/embeddings", content=body,
                                        headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=big)
    thread.start()
    slowest = 0.0
    while thread.is_alive():
        started = time.monotonic()
        assert httpx.get(served.url + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
    thread.join()
    response = result["response"]
    summary = f"{len(body)} bytes answered {response.status_code} in {result['seconds']:.2f}s; slowest /health {slowest:.3f}s"
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded", summary
    assert slowest < 0.5, summary


def test_a_body_that_stops_arriving_gets_408(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_BODY_TIMEOUT_S": "1"})
    conn = _connect(gateway)
    conn.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")  # fmt: skip
    answer = _answer(conn, timeout_s=10)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:300]


def test_connections_beyond_the_bound_get_503(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_MAX_CONNECTIONS": "16"})
    held = [_connect(gateway) for _ in range(16)]
    for conn in held:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # kept alive afterwards
    time.sleep(0.5)
    response = httpx.get(gateway.url + "/health", headers={"Connection": "close"})
    assert response.status_code == 503
    for conn in held:
        conn.close()
