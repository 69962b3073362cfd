"""``python -m bench`` (or ``make bench``): embedq against vLLM on this machine, in one run.

Every figure is printed next to a baseline measured in the same run (these machines are noisy),
as a ratio, and everything is written as JSON:

- engine: vLLM's offline ``LLM.embed`` limit; vLLM's own OpenAI server; embedq (gateway + one
  vLLM worker), each with the packaged all-MiniLM-L6-v2 on CPU, at 32 clients x 16 inputs and
  64 clients x 1 input, over the same 2,000 sentences. All three are started once and take turns,
  round after round (an idle one costs under 2% of a core), so that a slow spell of a shared
  machine hits each of them alike; ratios are taken within each round and the median is reported;
- gateway: the gateway path with a zero-delay fake worker against a bare ASGI endpoint that
  returns the same bytes, at 1 and 64 clients; and the gateway on CPython's own allocator
  against the C library's malloc it runs on (gateway/memory.py);
- scaling: 1, 2, 4, 8 fake workers of fixed per-batch delay;
- queue: the Redis queue backend against the in-memory one, one gateway and two zero-delay fake
  workers each, at 64 clients x 1 input and 32 clients x 16 inputs (the queue is all there is);
- batch: short interactive requests at 8/s, alone and beside a batch of long texts: the
  interactive p99 with the batch over without it, and the batch's lines/s over what it gets alone
  less the engine time the interactive load takes (``bench/batch.py``), on a fake worker (its cost
  shaped like vLLM's at bf16) and on a real vLLM worker;
- fairness: a light key's p99 beside a key flooding the worker with 32 clients x 16 long texts,
  both interactive, against its p99 alone (``bench/fairness.py``), on the fake and on real vLLM.

Each embedq run also reports the worker's engine calls: how many inputs each held, on average.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import time

import httpx

from bench.batch import beside_batch
from bench.fairness import light_beside_flood
from bench.load import run_load, sentences
from bench.stack import CPU_ENV, FREE, MODEL, Engine, engine_dtype, model_path, stack, tcmalloc_env, wait_for_model
from worker.machine import this_cpu_flags

ENGINE_LOADS = [(32, 16), (64, 1)]
ENGINES = ("fake", "vllm")  # the batch and fairness parts run on both
INTERACTIVE_OBJECTIVE_S = 0.1  # the gateway's default (EMBEDQ_INTERACTIVE_OBJECTIVE_S)
TARGETS = {
    "embedq / offline, 32x16": 0.95,
    "embedq / offline, 64x1": 0.6,
    "embedq / vLLM server, 64x1": 1.2,
    "gateway / bare ASGI requests/s, 64 clients": 0.5,
    "gateway on malloc / on pymalloc requests/s, 64 clients": 0.85,
    "8 fake workers / 1": 7.0,
    **{f"batch ({e}): the batch's share of what interactive leaves": 0.8 for e in ENGINES},
}
AT_MOST = {
    "gateway p50 added latency ms, 1 client": 2.0,
    **{f"batch ({e}): interactive p99 beside it / alone": 1.25 for e in ENGINES},
    **{f"fairness ({e}): light key's p99 added beside a flood, s": INTERACTIVE_OBJECTIVE_S for e in ENGINES},
}
ADMIN = "bench-admin-token"


def offline_engine():
    """vLLM's offline engine, with the engine settings of examples/all-minilm.toml."""
    os.environ.update({**CPU_ENV, **tcmalloc_env()})  # for the engine process it spawns
    from vllm import LLM

    llm = LLM(model=model_path(), runner="pooling", dtype=engine_dtype(), max_model_len=256, max_num_seqs=64, enforce_eager=True)
    llm.embed(sentences(128, seed=7), use_tqdm=False)  # warm-up
    return llm


def offline(llm, texts: list[str]) -> dict:
    started = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"inputs_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds}


def _loads(url: str, texts: list[str], engine: Engine | None = None) -> dict[str, dict]:
    """Each engine load; with the worker's ``engine``, the mean inputs of its calls too."""
    results = {}
    for c, n in ENGINE_LOADS:
        before = engine.counters() if engine else None
        results[f"{c}x{n}"] = run_load(url + "/v1/embeddings", MODEL, texts, c, n).as_dict()
        if engine and before:
            after = engine.counters()
            calls = after["calls"] - before["calls"]
            results[f"{c}x{n}"]["engine_calls"] = calls
            results[f"{c}x{n}"]["inputs_per_call"] = (after["inputs"] - before["inputs"]) / max(calls, 1)
    return results


def engine(texts: list[str], rounds: int) -> dict:
    llm = offline_engine()
    try:
        with stack() as s:
            systems = {"vllm_server": s.vllm_server(), "embedq": s.gateway()}
            worker = s.vllm_worker(systems["embedq"])
            wait_for_model(systems["embedq"])
            for url in systems.values():
                run_load(url + "/v1/embeddings", MODEL, sentences(256, seed=7), 16, 16)  # warm-up
            results = []
            for round_ in range(rounds):
                measured = {"offline": offline(llm, texts)}
                for name in sorted(systems, reverse=round_ % 2 == 1):  # each goes first every other round
                    measured[name] = _loads(systems[name], texts, worker if name == "embedq" else None)
                results.append(measured)
    finally:
        llm.llm_engine.engine_core.shutdown()  # free the cores for what follows
        del llm
        gc.collect()
    return {"rounds": results}


def gateway_path() -> dict:
    texts = [f"request {i}" for i in range(2000)]
    results: dict[str, dict] = {}
    with stack() as s:
        url = s.gateway()
        s.fake_worker(url, cost=FREE)
        wait_for_model(url)
        body = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ["request 0"]}).content
        bare = s.bare(body)
        on_pymalloc = s.gateway({"PYTHONMALLOC": "pymalloc"})  # CPython's own allocator (gateway/memory.py)
        s.fake_worker(on_pymalloc, cost=FREE)
        wait_for_model(on_pymalloc)
        for name, target in (("bare", bare), ("gateway", url), ("gateway_pymalloc", on_pymalloc)):
            run_load(target + "/v1/embeddings", MODEL, texts[:200], 8, 1)  # warm-up
            results[name] = {
                "1_client": run_load(target + "/v1/embeddings", MODEL, texts[:500], 1, 1).as_dict(),
                "64_clients": run_load(target + "/v1/embeddings", MODEL, texts, 64, 1).as_dict(),
            }
    return results


def scaling(call_s: float = 0.05, per_request: int = 8) -> dict:
    results = {}
    for workers in (1, 2, 4, 8):
        with stack() as s:
            url = s.gateway()
            for _ in range(workers):
                s.fake_worker(url, max_num_seqs=per_request, cost=f"call_s = {call_s}\ntoken_s = 0")
            wait_for_model(url, workers=workers)
            texts = [f"scaling {i}" for i in range(per_request * 60 * workers)]
            results[str(workers)] = run_load(url + "/v1/embeddings", MODEL, texts, 16 * workers, per_request).as_dict()
    return results


def queue_backends() -> dict:
    texts = [f"queue {i}" for i in range(4000)]
    results = {}
    for backend in ("memory", "redis"):
        with stack() as s:
            env = {"EMBEDQ_QUEUE": "redis", "EMBEDQ_REDIS_URL": s.redis_server()} if backend == "redis" else {}
            url = s.gateway(env)
            s.fake_worker(url, cost=FREE)
            s.fake_worker(url, cost=FREE)
            wait_for_model(url, workers=2)
            run_load(url + "/v1/embeddings", MODEL, texts[:400], 16, 1)  # warm-up
            results[backend] = {
                "64x1": run_load(url + "/v1/embeddings", MODEL, texts[:2000], 64, 1).as_dict(),
                "32x16": run_load(url + "/v1/embeddings", MODEL, texts, 32, 16).as_dict(),
            }
    return results


def batch_beside_interactive() -> dict:
    results = {}
    for name in ENGINES:
        with stack() as s:
            url = s.gateway()
            engine = s.fake_worker(url) if name == "fake" else s.vllm_worker(url)
            wait_for_model(url)
            lines = 8000 if name == "fake" else 6000
            results[name] = asyncio.run(beside_batch(url, MODEL, engine.counters, rate=8, seconds=20, lines=lines)).as_dict()
    return results


def fairness() -> dict:
    results = {}
    for name in ENGINES:
        with stack() as s:
            url = s.gateway({"EMBEDQ_KEYS_DB": str(s.workdir / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN})
            s.fake_worker(url) if name == "fake" else s.vllm_worker(url)
            wait_for_model(url)
            results[name] = asyncio.run(light_beside_flood(url, MODEL, ADMIN)).as_dict()
    return results


def ratios(results: dict) -> dict[str, float]:
    out = {}
    if "engine" in results:
        rounds = results["engine"]["rounds"]
        for load in ("32x16", "64x1"):
            out[f"embedq / offline, {load}"] = statistics.median(
                r["embedq"][load]["inputs_per_s"] / r["offline"]["inputs_per_s"] for r in rounds
            )
        for load in ("32x16", "64x1"):
            out[f"embedq / vLLM server, {load}"] = statistics.median(
                r["embedq"][load]["inputs_per_s"] / r["vllm_server"][load]["inputs_per_s"] for r in rounds
            )
    if "gateway" in results:
        g = results["gateway"]
        out["gateway / bare ASGI requests/s, 64 clients"] = (
            g["gateway"]["64_clients"]["requests_per_s"] / g["bare"]["64_clients"]["requests_per_s"]
        )
        out["gateway p50 added latency ms, 1 client"] = g["gateway"]["1_client"]["p50_ms"] - g["bare"]["1_client"]["p50_ms"]
        out["gateway on malloc / on pymalloc requests/s, 64 clients"] = (
            g["gateway"]["64_clients"]["requests_per_s"] / g["gateway_pymalloc"]["64_clients"]["requests_per_s"]
        )
    if "scaling" in results:
        sc = results["scaling"]
        for workers in ("2", "4", "8"):
            out[f"{workers} fake workers / 1"] = sc[workers]["inputs_per_s"] / sc["1"]["inputs_per_s"]
    if "queue" in results:
        q = results["queue"]
        for load in ("64x1", "32x16"):
            out[f"Redis / memory queue inputs/s, {load}"] = q["redis"][load]["inputs_per_s"] / q["memory"][load]["inputs_per_s"]
    for name, b in results.get("batch", {}).items():
        out[f"batch ({name}): interactive p99 beside it / alone"] = b["p99_ratio"]
        out[f"batch ({name}): the batch's share of what interactive leaves"] = b["batch_share"]
    for name, f in results.get("fairness", {}).items():
        out[f"fairness ({name}): light key's p99 added beside a flood, s"] = f["p99_added_s"]
    return out


def report(results: dict) -> None:
    if "engine" in results:
        for number, e in enumerate(results["engine"]["rounds"], 1):
            print(
                f"\nround {number}: offline LLM.embed {e['offline']['inputs_per_s']:.1f} sentences/s, "
                f"{e['offline']['tokens_per_s']:.0f} tokens/s"
            )
            print(f"{'system':14} {'load':6} {'sent/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'inputs/call':>12}")
            for system in ("vllm_server", "embedq"):
                for load, r in e[system].items():
                    per_call = f"{r['inputs_per_call']:12.1f}" if "inputs_per_call" in r else ""
                    print(
                        f"{system:14} {load:6} {r['inputs_per_s']:8.1f} {r['tokens_per_s']:8.0f} "
                        f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}{per_call}"
                    )
    if "gateway" in results:
        for name, r in results["gateway"].items():
            print(
                f"{name:16} 1 client p50 {r['1_client']['p50_ms']:.2f} ms; "
                f"64 clients {r['64_clients']['requests_per_s']:.0f} req/s"
            )
    if "scaling" in results:
        for workers, r in results["scaling"].items():
            print(f"{workers} fake workers: {r['inputs_per_s']:.0f} inputs/s")
    if "queue" in results:
        for backend, loads in results["queue"].items():
            for load, r in loads.items():
                print(
                    f"{backend:6} queue {load:6} {r['inputs_per_s']:8.0f} inputs/s  "
                    f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
                )
    for name, b in results.get("batch", {}).items():
        print(
            f"batch ({name}): interactive p50/p99 alone {b['alone_p50_s'] * 1000:.0f}/{b['alone_p99_s'] * 1000:.0f} ms, "
            f"beside the batch {b['shared_p50_s'] * 1000:.0f}/{b['shared_p99_s'] * 1000:.0f} ms; batch {b['batch']:.1f} "
            f"lines/s of {b['capacity']:.1f} alone, interactive used {b['interactive_use']:.0%} of the engine; "
            f"engine calls of {b['calls_alone']:.1f} inputs (batch alone), {b['calls_shared']:.1f} (beside)"
        )
    for name, f in results.get("fairness", {}).items():
        print(
            f"fairness ({name}): light key p50/p99 alone {f['alone_p50_s'] * 1000:.0f}/{f['alone_p99_s'] * 1000:.0f} ms, "
            f"beside the flood {f['shared_p50_s'] * 1000:.0f}/{f['shared_p99_s'] * 1000:.0f} ms; the flood: "
            f"{f['flood_served']} served ({f['flood_inputs_per_s']:.1f} inputs/s), {f['flood_429']} 429s"
        )
    print()
    for name, value in results["ratios"].items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  (target >= {target}: {'met' if value >= target else 'NOT met'})"
        if name in AT_MOST:
            verdict = f"  (target <= {AT_MOST[name]}: {'met' if value <= AT_MOST[name] else 'NOT met'})"
        print(f"{name:45} {value:7.3f}{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        default="engine,gateway,scaling,queue,batch,fairness",
        help="comma-separated: engine, gateway, scaling, queue, batch, fairness",
    )
    parser.add_argument("--out", default="bench-results.json", help="where to write the JSON results")
    parser.add_argument("--rounds", type=int, default=3, help="engine part: turns each system takes (default 3)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _cpu_model(),
            "python": platform.python_version(),
            "flags": sorted(this_cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "dtype": engine_dtype(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "engine" in parts:
        results["engine"] = engine(sentences(), args.rounds)
    if "gateway" in parts:
        results["gateway"] = gateway_path()
    if "scaling" in parts:
        results["scaling"] = scaling()
    if "queue" in parts:
        results["queue"] = queue_backends()
    if "batch" in parts:
        results["batch"] = batch_beside_interactive()
    if "fairness" in parts:
        results["fairness"] = fairness()
    results["ratios"] = ratios(results)
    report(results)
    with open(args.out, "w") as out:
        json.dump(results, out, indent=2)
    print(f"\nwritten to {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":  # vLLM spawns processes: the entry point must sit behind this guard
    main()
