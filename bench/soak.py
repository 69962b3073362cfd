"""``python -m bench.soak`` (``make soak``): a real vLLM worker under steady load for a long while,
its memory and throughput watched.

One gateway and one vLLM worker serving the packaged all-MiniLM-L6-v2 (the worker's own config:
dtype "auto", tcmalloc preloaded for the engine), 32 closed-loop clients of 16 sentences each,
for ``--minutes`` (default 20). Every ``--every`` seconds (default 30) the resident memory of the
worker's whole process tree (the worker and vLLM's engine processes) is summed. What it reports:
memory growth from the 5-minute mark to the end (target at most 5%), and throughput over the
last 5 minutes against the first 5 (target at least 95%).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from bench.load import run_load, sentences
from bench.stack import MODEL, engine_dtype, stack, wait_for_model

WINDOW_S = 300.0  # "the first 5 minutes", "the last 5 minutes"


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (kernel's VmRSS, KiB)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue  # gone meanwhile, or a kernel thread
    return total


def soak(minutes: float, every_s: float) -> dict:
    texts = sentences()
    samples: list[tuple[float, int]] = []  # (seconds since start, KiB)
    rounds: list[tuple[float, float, int]] = []  # (started, ended, inputs), seconds since start
    with stack() as s:
        url = s.gateway()
        worker = s.vllm_worker(url)
        wait_for_model(url)
        run_load(url + "/v1/embeddings", MODEL, texts[:256], 16, 16)  # warm-up
        started = time.monotonic()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.monotonic() - started, tree_rss_kib(worker.pid)))
                print(f"{samples[-1][0]:7.0f}s  worker tree RSS {samples[-1][1] / 1024:7.0f} MiB", flush=True)
                done.wait(every_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        while time.monotonic() - started < minutes * 60:
            begun = time.monotonic() - started
            result = run_load(url + "/v1/embeddings", MODEL, texts, 32, 16)
            rounds.append((begun, time.monotonic() - started, result.requests * 16))
        done.set()
        sampler.join()
    return summarize(samples, rounds, minutes)


def summarize(samples: list[tuple[float, int]], rounds: list[tuple[float, float, int]], minutes: float) -> dict:
    end = rounds[-1][1]
    at_five = next((kib for t, kib in samples if t >= WINDOW_S), samples[0][1])
    first = [r for r in rounds if r[1] <= WINDOW_S]
    last = [r for r in rounds if r[0] >= end - WINDOW_S]

    def rate(window: list[tuple[float, float, int]]) -> float:
        return sum(r[2] for r in window) / sum(r[1] - r[0] for r in window)

    return {
        "minutes": minutes,
        "dtype": engine_dtype(),
        "rss_mib": [[round(t), round(kib / 1024)] for t, kib in samples],
        "rss_growth_after_5_min": samples[-1][1] / at_five - 1,
        "sentences_per_s_first_5_min": rate(first),
        "sentences_per_s_last_5_min": rate(last),
        "throughput_last_vs_first": rate(last) / rate(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--every", type=float, default=30, help="seconds between memory samples")
    parser.add_argument("--out", default="soak-results.json")
    args = parser.parse_args()
    result = soak(args.minutes, args.every)
    growth, ratio = result["rss_growth_after_5_min"], result["throughput_last_vs_first"]
    print(f"\nmemory growth after 5 min: {growth:+.1%} (target <= +5%: {'met' if growth <= 0.05 else 'NOT met'})")
    print(
        f"throughput, last 5 min / first 5 min: {ratio:.3f} ({result['sentences_per_s_last_5_min']:.1f} / "
        f"{result['sentences_per_s_first_5_min']:.1f} sentences/s; target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
    )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":  # vLLM spawns processes: the entry point must sit behind this guard
    main()
