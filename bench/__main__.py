"""``python -m bench`` (or ``make bench``): embedq against vLLM on this machine, in one run.

Every figure is printed next to a baseline measured in the same run (these machines are noisy),
as a ratio, and everything is written as JSON:

- engine: vLLM's offline ``LLM.embed`` limit; vLLM's own OpenAI server; embedq (gateway + one
  vLLM worker), each with the packaged all-MiniLM-L6-v2 on CPU, at 32 clients x 16 inputs and
  64 clients x 1 input, over the same 2,000 sentences. All three are started once and take turns,
  round after round (an idle one costs under 2% of a core), so that a slow spell of a shared
  machine hits each of them alike; ratios are taken within each round and the median is reported;
- gateway: the gateway path with a zero-delay fake worker against a bare ASGI endpoint that
  returns the same bytes, at 1 and 64 clients;
- scaling: 1, 2, 4, 8 fake workers of fixed per-batch delay;
- queue: the Redis queue backend against the in-memory one, one gateway and two zero-delay fake
  workers each, at 64 clients x 1 input and 32 clients x 16 inputs (the queue is all there is);
- batch: interactive requests at half of one fixed-pace fake worker's capacity, alone and beside a
  50,000-line batch: the interactive p99 with the batch over without it, and the batch's share of
  the capacity left idle (``bench/batch.py``);
- fairness: a light key's p99 beside a key flooding one fixed-pace fake worker at 10x its
  capacity, over the light key's alone (``bench/fairness.py``).
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
from bench.stack import CPU_ENV, MODEL, engine_dtype, model_path, stack, tcmalloc_env, wait_for_model
from worker.machine import this_cpu_flags

ENGINE_LOADS = [(32, 16), (64, 1)]
TARGETS = {
    "embedq / offline, 32x16": 0.95,
    "embedq / vLLM server, 32x16": 1.10,
    "embedq / vLLM server, 64x1": 1.10,
    "gateway / bare ASGI requests/s, 64 clients": 0.5,
    "8 fake workers / 1": 7.0,
    "batch: its share of the idle capacity": 0.8,
}
AT_MOST = {
    "gateway p50 added latency ms, 1 client": 2.0,
    "batch: interactive p99 beside it / alone": 1.25,
    "fairness: light key's p99 beside a flood / alone": 1.3,
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


def _loads(url: str, texts: list[str]) -> dict[str, dict]:
    return {f"{c}x{n}": run_load(url + "/v1/embeddings", MODEL, texts, c, n).as_dict() for c, n in ENGINE_LOADS}


def engine(texts: list[str], rounds: int) -> dict:
    llm = offline_engine()
    try:
        with stack() as s:
            systems = {"vllm_server": s.vllm_server(), "embedq": s.gateway()}
            s.vllm_worker(systems["embedq"])
            wait_for_model(systems["embedq"])
            for url in systems.values():
                run_load(url + "/v1/embeddings", MODEL, sentences(256, seed=7), 16, 16)  # warm-up
            results = []
            for round_ in range(rounds):
                measured = {"offline": offline(llm, texts)}
                for name in sorted(systems, reverse=round_ % 2 == 1):  # each goes first every other round
                    measured[name] = _loads(systems[name], texts)
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
        s.fake_worker(url)
        wait_for_model(url)
        body = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": ["request 0"]}).content
        bare = s.bare(body)
        for name, target in (("bare", bare), ("gateway", url)):
            run_load(target + "/v1/embeddings", MODEL, texts[:200], 8, 1)  # warm-up
            results[name] = {
                "1_client": run_load(target + "/v1/embeddings", MODEL, texts[:500], 1, 1).as_dict(),
                "64_clients": run_load(target + "/v1/embeddings", MODEL, texts, 64, 1).as_dict(),
            }
    return results


def scaling(delay_s: float = 0.05, per_request: int = 8) -> dict:
    results = {}
    for workers in (1, 2, 4, 8):
        with stack() as s:
            url = s.gateway()
            for _ in range(workers):
                s.fake_worker(url, delay_s=delay_s, max_num_seqs=per_request)
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
            s.fake_worker(url)
            s.fake_worker(url)
            wait_for_model(url, workers=2)
            run_load(url + "/v1/embeddings", MODEL, texts[:400], 16, 1)  # warm-up
            results[backend] = {
                "64x1": run_load(url + "/v1/embeddings", MODEL, texts[:2000], 64, 1).as_dict(),
                "32x16": run_load(url + "/v1/embeddings", MODEL, texts, 32, 16).as_dict(),
            }
    return results


def batch_beside_interactive() -> dict:
    with stack() as s:
        url = s.gateway()
        s.fake_worker(url, delay_s=0.1, max_num_seqs=8)  # 80 inputs/s
        wait_for_model(url)
        return asyncio.run(beside_batch(url, MODEL, rate=40, seconds=20)).as_dict()


def fairness() -> dict:
    with stack() as s:
        url = s.gateway({"EMBEDQ_KEYS_DB": str(s.workdir / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN})
        s.fake_worker(url, delay_s=0.2, max_num_seqs=1)  # 5 requests/s
        wait_for_model(url)
        return asyncio.run(light_beside_flood(url, MODEL, ADMIN, flood_rate=50)).as_dict()


def ratios(results: dict) -> dict[str, float]:
    out = {}
    if "engine" in results:
        rounds = results["engine"]["rounds"]
        out["embedq / offline, 32x16"] = statistics.median(
            r["embedq"]["32x16"]["inputs_per_s"] / r["offline"]["inputs_per_s"] for r in rounds
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
    if "scaling" in results:
        sc = results["scaling"]
        for workers in ("2", "4", "8"):
            out[f"{workers} fake workers / 1"] = sc[workers]["inputs_per_s"] / sc["1"]["inputs_per_s"]
    if "queue" in results:
        q = results["queue"]
        for load in ("64x1", "32x16"):
            out[f"Redis / memory queue inputs/s, {load}"] = q["redis"][load]["inputs_per_s"] / q["memory"][load]["inputs_per_s"]
    if "batch" in results:
        out["batch: interactive p99 beside it / alone"] = results["batch"]["p99_ratio"]
        out["batch: its share of the idle capacity"] = results["batch"]["batch_share"]
    if "fairness" in results:
        out["fairness: light key's p99 beside a flood / alone"] = results["fairness"]["p99_ratio"]
    return out


def report(results: dict) -> None:
    if "engine" in results:
        for number, e in enumerate(results["engine"]["rounds"], 1):
            print(
                f"\nround {number}: offline LLM.embed {e['offline']['inputs_per_s']:.1f} sentences/s, "
                f"{e['offline']['tokens_per_s']:.0f} tokens/s"
            )
            print(f"{'system':14} {'load':6} {'sent/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            for system in ("vllm_server", "embedq"):
                for load, r in e[system].items():
                    print(
                        f"{system:14} {load:6} {r['inputs_per_s']:8.1f} {r['tokens_per_s']:8.0f} "
                        f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f}"
                    )
    if "gateway" in results:
        for name, r in results["gateway"].items():
            print(
                f"{name:8} 1 client p50 {r['1_client']['p50_ms']:.2f} ms; "
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
    if "batch" in results:
        b = results["batch"]
        print(
            f"interactive p99 alone {b['alone_p99_s'] * 1000:.0f} ms, beside a batch {b['shared_p99_s'] * 1000:.0f} ms; "
            f"batch {b['batch']:.1f} lines/s, capacity {b['capacity']:.1f}/s, interactive {b['interactive']:.1f}/s"
        )
    if "fairness" in results:
        f = results["fairness"]
        print(
            f"light key p99 alone {f['alone_p99_s'] * 1000:.0f} ms, beside a 10x flood {f['shared_p99_s'] * 1000:.0f} ms; "
            f"the flood: {f['flood_served']} served, {f['flood_429']} 429s"
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
