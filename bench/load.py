"""The benchmark's inputs and its load generator.

Sentences are deterministic (a fixed seed over a fixed vocabulary), so every run and every
system embeds the same 2,000 texts. The load generator is asyncio + aiohttp in one process:
the lightest client at hand, since on a small machine the client competes with the server.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import aiohttp
import httpx

WORDS = (
    "the of and to in is it that was for on are as with his they at be this from have or by one had not but "
    "what all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called just "
    "where most know get through back much before go good new write our used me man too any day same right look "
    "think also around another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say small every found "
    "still between name should home big give air line set own under read last never us left end along while "
    "might next sound below saw something thought both few those always looked show large often together asked "
    "house world going want school important until form food keep children feet land side without boy once "
    "animals life enough took sometimes four head above kind began almost live page got earth need far hand high"
).split()
PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')


def sentences(count: int = 2000, seed: int = 1234, words: tuple[int, int] = (20, 60)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(count)]


def long_texts(count: int, seed: int = 99) -> list[str]:
    """Texts of 170-190 words (about 180 tokens: most of all-MiniLM's 256), as a corpus is chunked."""
    return sentences(count, seed, words=(170, 190))


@dataclass
class LoadResult:
    clients: int
    inputs_per_request: int
    requests: int
    seconds: float
    inputs_per_s: float
    tokens_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


async def _drive(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    tokens = 0
    pending = iter(bodies)
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def client() -> None:
            nonlocal tokens
            for body in pending:
                started = time.perf_counter()
                async with session.post(url, json=body) as response:
                    payload = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{url}: HTTP {response.status}: {payload[:300]!r}")
                latencies.append(time.perf_counter() - started)
                match = PROMPT_TOKENS.search(payload, max(0, len(payload) - 200))
                tokens += int(match.group(1)) if match else 0

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started, latencies, tokens


def run_load(
    url: str, model: str, texts: list[str], clients: int, per_request: int, encoding_format: str = "float"
) -> LoadResult:
    """Send all texts, per_request at a time, from `clients` concurrent closed-loop clients."""
    bodies = [
        {"model": model, "input": texts[i : i + per_request], "encoding_format": encoding_format}
        for i in range(0, len(texts), per_request)
    ]
    seconds, latencies, tokens = asyncio.run(_drive(url, bodies, clients))
    latencies.sort()
    return LoadResult(
        clients=clients,
        inputs_per_request=per_request,
        requests=len(bodies),
        seconds=seconds,
        inputs_per_s=len(texts) / seconds,
        tokens_per_s=tokens / seconds,
        requests_per_s=len(bodies) / seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[int(0.99 * (len(latencies) - 1))] * 1000,
    )


async def open_loop(
    url: str, rate: float, duration_s: float, body: dict, headers: dict | None = None, timeout_s: float = 90
) -> list[tuple[int, float]]:
    """Requests sent at ``rate`` per second for ``duration_s`` whatever the answers (an open loop,
    as many independent clients): (status, seconds) per request, 0 for a transport error."""

    async def one(client: httpx.AsyncClient, n: int) -> tuple[int, float]:
        started = time.perf_counter()
        try:
            response = await client.post("/v1/embeddings", json={**body, "input": f"{body.get('input', 'text')} {n}"})
            return response.status_code, time.perf_counter() - started
        except httpx.HTTPError:
            return 0, time.perf_counter() - started

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        tasks, started = [], time.perf_counter()
        for n in range(int(rate * duration_s)):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, n)))
        return list(await asyncio.gather(*tasks))


async def closed_loop(
    url: str, bodies: Iterator[dict], clients: int, duration_s: float, headers: dict | None = None, timeout_s: float = 90
) -> list[tuple[int, float]]:
    """``clients`` clients each sending the next body as soon as its last one is answered, for
    ``duration_s`` (a flood that keeps its own pace): (status, seconds) per request. On aiohttp,
    the lightest client at hand: a flood's own CPU must not be what delays a measured client."""
    outcomes: list[tuple[int, float]] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(
        url, connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as session:
        until = time.perf_counter() + duration_s

        async def one_client() -> None:
            for body in bodies:
                if time.perf_counter() >= until:
                    return
                started = time.perf_counter()
                retry_after = 0.0
                try:
                    async with session.post("/v1/embeddings", json=body) as response:
                        await response.read()
                        status = response.status
                        retry_after = float(response.headers.get("Retry-After", 1)) if status == 429 else 0.0
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                outcomes.append((status, time.perf_counter() - started))
                await asyncio.sleep(retry_after)  # as the OpenAI client does

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")
