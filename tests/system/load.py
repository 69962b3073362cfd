"""Closed-loop load for fault tests: distinct texts per request, every outcome tallied, every
vector checked against what the fake engine must answer."""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from bench.load import open_loop, percentile  # noqa: F401  (tenancy and batch tests import them from here)
from tests.fakes import DIMS, MODEL, expected, metric  # noqa: F401  (fault tests import them from here)


class Load:
    """Closed-loop clients sending distinct texts; tallies every outcome and checks vectors."""

    def __init__(self, url: str, clients: int, inputs: int = 3, timeout_s: float = 60):
        self.url, self.clients, self.inputs, self.timeout_s = url, clients, inputs, timeout_s
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.wrong: list[str] = []
        self.slowest_s = 0.0  # the longest any request waited for its answer
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = []

    def start(self, requests_each: int | None = None, total: int | None = None) -> Load:
        """Each client sends requests_each requests, or all of them ``total`` between them, or
        they keep sending until join()."""
        self._open_ended = requests_each is None and total is None
        self._left = total
        self._futures = [self._pool.submit(self._client, c, requests_each) for c in range(self.clients)]
        return self

    def _another(self) -> bool:
        """Whether a client whose share is not fixed sends one more."""
        with self._lock:
            if self._left is None:
                return not self.stop.is_set()
            self._left -= 1
            return self._left >= 0

    def join(self) -> Load:
        if self._open_ended:
            self.stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self

    def _client(self, client: int, requests_each: int | None) -> None:
        with httpx.Client(timeout=self.timeout_s) as http:
            n = 0
            while n < requests_each if requests_each is not None else self._another():
                texts = [f"client {client} request {n} input {i}" for i in range(self.inputs)]
                started = time.monotonic()
                response = self._send(http, texts)
                with self._lock:
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self._record(response, texts)
                n += 1

    def _send(self, http: httpx.Client, texts: list[str]) -> httpx.Response | str:
        try:
            return http.post(self.url + "/v1/embeddings", json={"model": MODEL, "input": texts})
        except httpx.ConnectError:
            return "connection refused"
        except httpx.HTTPError as exc:
            return type(exc).__name__

    def _record(self, response: httpx.Response | str, texts: list[str]) -> None:
        if isinstance(response, str):
            outcome = response
        elif response.status_code == 200:
            got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
            outcome = "200"
            if not np.array_equal(got, expected(texts)):
                with self._lock:
                    self.wrong.append(texts[0])
        else:
            outcome = f"{response.status_code} {response.json()['error'].get('code')}"
        with self._lock:
            self.outcomes[outcome] += 1

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> str:
        return (
            f"sent {self.sent}: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items()))
            + f"; wrong vectors: {len(self.wrong)}; slowest answer {self.slowest_s:.1f}s"
        )
