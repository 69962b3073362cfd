"""``python -m worker --config FILE [--check]``

Exit codes: 0 clean stop (or a passing --check), 1 the engine failed to start, 2 bad config (or
its metrics port is taken), 3 the engine died while serving (a supervisor should restart the
worker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, start_http_server

from worker.batch import EngineDead
from worker.client import GatewayClient
from worker.config import ConfigError, VllmGenerator, WorkerConfig, config_warnings, load_config
from worker.engines import build_engine
from worker.machine import has_gpu, resolve_dtype, this_cpu_flags
from worker.metrics import WorkerMetrics
from worker.model_files import length_limit, model_problems, served_prompts
from worker.runner import Worker

log = logging.getLogger("worker")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description="embedq worker: leases jobs, runs vLLM")
    parser.add_argument("--config", required=True, help="path to the worker's config.toml")
    parser.add_argument("--check", action="store_true", help="validate and print the resolved config, then exit")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address for the metrics server (default 0.0.0.0)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def check(config: WorkerConfig) -> int:
    """Print the resolved config, with what this machine makes of it (the dtype, and why) and of
    the model's own files (the longest input, the prompts that apply); 2 if they refuse it."""
    for warning in config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if problems := model_problems(config):
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    resolved = config.redacted()
    generator = config.generator
    if isinstance(generator, VllmGenerator):
        dtype = resolve_dtype(generator.dtype, has_gpu(), this_cpu_flags())
        resolved["resolved"] = {"dtype": dtype.dtype, "why": dtype.why}
        if dtype.warning:
            print(f"warning: {dtype.warning}", file=sys.stderr)
        if Path(generator.model_path).is_dir():
            limit = length_limit(generator.model_path)
            resolved["resolved"]["model_max_len"] = limit and {"tokens": limit.tokens, "from": limit.source}
            resolved["resolved"]["models"] = {
                name: dataclasses.asdict(served_prompts(generator.model_path, model.prompts, model.default_prompt))
                for name, model in config.queue.models.items()
            }
    print(json.dumps(resolved, indent=2))
    return 0


async def serve(config: WorkerConfig, token: str, metrics_host: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    port = config.monitoring.metrics_port
    try:
        server, _ = start_http_server(port, addr=metrics_host, registry=registry)
    except OSError as exc:
        log.error("monitoring.metrics_port: cannot serve metrics on %s:%d: %s", metrics_host, port, exc.strerror or exc)
        return 2
    log.info("metrics on http://%s:%d/metrics", metrics_host, server.server_port)
    try:
        engine = await asyncio.to_thread(build_engine, config.generator)
    except Exception:
        server.shutdown()
        if stop.is_set():  # Ctrl-C reaches vLLM's own processes too and ends their start-up
            log.info("stopped during engine start-up")
            return 0
        log.exception("the engine failed to start")
        return 1
    queue = config.queue
    client = GatewayClient(queue.url, token, queue.http_request_retries, queue.http_timeout_s, metrics)
    try:
        return await _run_until_drained(Worker(config, engine, client, metrics), stop, queue.drain_timeout_s)
    finally:
        await client.aclose()
        with contextlib.suppress(Exception):  # a dead engine may not close cleanly
            engine.close()
        server.shutdown()


async def _run_until_drained(worker: Worker, stop: asyncio.Event, drain_timeout_s: float) -> int:
    """Serve; once stopped, give the jobs in hand drain_timeout_s to be answered."""
    running = asyncio.create_task(worker.run(stop))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not running.done():
        log.info("stopping: no new leases; finishing the jobs in hand (at most %gs)", drain_timeout_s)
        done, _ = await asyncio.wait({running}, timeout=drain_timeout_s)
        if not done:
            log.warning("drain took longer than %gs; giving the jobs in hand back", drain_timeout_s)
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            return 0
    try:
        running.result()
    except EngineDead as exc:
        log.error("the engine died (%s); exiting so that a supervisor restarts this worker", exc)
        return 3
    log.info("worker stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per lease is noise
    try:
        config = load_config(args.config)
        if args.check:
            return check(config)
        if problems := model_problems(config):
            raise ConfigError("\n".join(problems))
        token = config.queue.resolved_token()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in config_warnings(config):
        log.warning(warning)
    return uvloop.run(serve(config, token, args.metrics_host))  # aiohttp and the pipeline on libuv: less CPU per call


# vLLM starts engine processes with spawn: the entry point must sit behind this guard.
if __name__ == "__main__":
    sys.exit(main())
