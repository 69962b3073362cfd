"""Real processes on loopback: a gateway and workers started as ``python -m ...``, and a real
``redis-server`` (Debian's package) for the Redis queue backend.

Ports are ephemeral (asked of the kernel), every process is stopped at teardown, and each
process's output goes to a log file that a failing test prints. Tests that run on both queue
backends override the ``queue_backend`` fixture with a parametrised one.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests import REPO
from tests.fakes import fake_worker_config  # noqa: F401  (the system tests import it from here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Proc:
    """A child process whose output goes to a log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    nofile: int | None = None  # its file limit, soft and hard (None: this process's)
    source: Path = REPO  # the tree it runs from (another release's, unpacked, in the mixed-fleet test)
    popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        limit = self.nofile
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(
                [sys.executable, *self.args],
                cwd=self.source,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                preexec_fn=None if limit is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
            )
        return self

    def rss_mib(self) -> float:
        """Its resident memory now."""
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    def cpu_s(self) -> float:
        """The CPU time it has used so far, user and system."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def idle_cpu(self, seconds: float = 5.0) -> float:
        """The share of a core it uses over ``seconds`` while nobody calls it."""
        before = self.cpu_s()
        time.sleep(seconds)
        return (self.cpu_s() - before) / seconds

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Gateway:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.url + "/v1/models").json()["data"]]

    def wait_for_model(self, model: str, timeout_s: float = 30) -> None:
        def listed() -> bool:  # /health lists the models to anyone; /v1/models may need a key
            return model in httpx.get(self.url + "/health").json()["models"]

        wait_until(listed, timeout_s, f"model {model!r} to be listed\n{self.proc.log()}")


class RedisServer:
    """A redis-server of its own on a loopback port, with AOF on (fsync every second)."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server not found: `make test` installs it (Debian: apt-get install redis-server)")
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = Proc("redis", [], workdir / "redis.log")

    def start(self) -> RedisServer:
        with open(self.proc.log_path, "ab") as log:
            self.proc.popen = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.dir),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                    "--save",
                    "",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._answers, 10, "redis-server to answer")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.stop(sig)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """One redis-server for the session; each Cluster keeps to its own key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def queue_backend() -> str:
    """The gateway's queue backend in ``cluster``; modules that run on both override it."""
    return "memory"


class Cluster:
    """Starts gateways and workers for one test (or module) and stops them all at the end.

    With a RedisServer, every gateway of the cluster is a replica on the Redis queue (one
    key prefix per cluster); without, each gateway has its own in-memory queue.
    """

    def __init__(self, tmp: Path, redis: RedisServer | None = None):
        self.tmp = tmp
        self.redis = redis
        self.prefix = "test-" + uuid.uuid4().hex[:8]
        self.procs: list[Proc] = []

    def gateway(
        self,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        defaults: bool = False,
        nofile: int | None = None,
        source: Path = REPO,
    ) -> Gateway:
        """A gateway with a data directory of its own; unless ``defaults``, with a short worker TTL
        and wait, to keep tests short. ``nofile``: its file limit, soft and hard; ``source``: the
        tree it runs from."""
        port = port or free_port()
        quick = {} if defaults else {"EMBEDQ_WORKER_TTL_S": "2", "EMBEDQ_WORKER_WAIT_S": "1"}
        env = {"EMBEDQ_DATA_DIR": str(self.tmp / f"data-{port}"), **quick, **self.queue_env(), **(env or {})}
        proc = self._start("gateway", ["-m", "gateway", "--host", host, "--port", str(port)], env, nofile, source)
        gateway = Gateway(proc, port)
        wait_until(lambda: _answers(gateway.url + "/health") or proc.popen.poll() is not None, 20, "the gateway")
        return gateway

    def queue_env(self) -> dict[str, str]:
        if self.redis is None:
            return {}
        return {"EMBEDQ_QUEUE": "redis", "EMBEDQ_REDIS_URL": self.redis.url, "EMBEDQ_REDIS_PREFIX": self.prefix}

    def worker(self, config_text: str, env: dict[str, str] | None = None, source: Path = REPO) -> Proc:
        path = self.tmp / f"worker-{len(self.procs)}.toml"
        path.write_text(config_text)
        return self._start("worker", ["-m", "worker", "--config", str(path)], env or {}, source=source)

    def _start(self, name: str, args: list[str], env: dict[str, str], nofile: int | None = None, source: Path = REPO) -> Proc:
        proc = Proc(name, args, self.tmp / f"{name}-{len(self.procs)}.log", env, nofile, source).start()
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} {p.args}\n{p.log()}" for p in self.procs)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest, queue_backend: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, request.getfixturevalue("redis_server") if queue_backend == "redis" else None)
    yield c
    c.stop_all()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(c.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
