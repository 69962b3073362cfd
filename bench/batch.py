"""A bulk batch beside interactive traffic: what it costs the interactive requests, and how much of
the capacity they leave the batch gets. One worker; short interactive requests (``priority:
interactive``) at a fixed rate, an open loop, alone; then a batch of long texts (one a line, the
Batch API) starts beside them, as a batch does on a fleet in use; then the batch alone, which gives
its capacity. The engine time the interactive load takes alone is read from the worker's metrics.
The same measurement is asserted by ``tests/system/test_batches.py`` (the fake engine) and
``tests/system/test_sharing_vllm.py`` (real vLLM), and reported by ``make bench``.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import openai
import orjson

from bench.load import long_texts, open_loop, percentile

Counters = Callable[[], dict[str, float]]  # the worker's engine counters now: calls, inputs, seconds


@dataclass
class BesideBatch:
    alone_p50_s: float  # interactive, without the batch
    alone_p99_s: float
    shared_p50_s: float  # the same load with the batch running
    shared_p99_s: float
    capacity: float  # lines per second the batch gets alone
    interactive_use: float  # the share of the engine's time the interactive load takes alone
    batch: float  # lines per second the batch got beside the interactive load
    calls_alone: float  # mean inputs per engine call: the batch alone
    calls_shared: float  # and beside the interactive load
    line_s: float  # engine seconds per line in the batch's calls alone
    busy_shared: float  # the share of the time the engine was computing, beside the interactive load
    served_all: bool  # every interactive request answered 200

    @property
    def p99_ratio(self) -> float:
        return self.shared_p99_s / self.alone_p99_s

    @property
    def batch_share(self) -> float:
        """The batch's rate over what it gets alone less the engine time the interactive load uses."""
        return self.batch / (self.capacity * (1 - self.interactive_use))

    def as_dict(self) -> dict:
        return {**asdict(self), "p99_ratio": self.p99_ratio, "batch_share": self.batch_share}

    def summary(self) -> str:
        return (
            f"interactive p50/p99 alone {self.alone_p50_s * 1000:.0f}/{self.alone_p99_s * 1000:.0f} ms, beside the batch "
            f"{self.shared_p50_s * 1000:.0f}/{self.shared_p99_s * 1000:.0f} ms ({self.p99_ratio:.2f}x at p99); batch "
            f"{self.batch:.1f} lines/s of {self.capacity:.1f} alone, interactive used {self.interactive_use:.0%} of the "
            f"engine alone ({self.batch_share:.0%} kept); engine calls of {self.calls_alone:.1f} inputs alone, "
            f"{self.calls_shared:.1f} beside; engine busy {self.busy_shared:.0%} of the time beside"
        )


def start_batch(oai: openai.OpenAI, model: str, lines: dict[str, list[str]]):
    content = b"".join(
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": texts}})
        + b"\n"
        for cid, texts in lines.items()
    )
    uploaded = oai.files.create(file=("corpus.jsonl", io.BytesIO(content)), purpose="batch")
    return oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


async def beside_batch(
    url: str, model: str, engine: Counters, rate: float, seconds: float, lines: int, key: str = "unused"
) -> BesideBatch:
    """Interactive alone; then a batch starts beside it (the shared figures are taken once its
    first lines are done); then the batch alone, its capacity. The batch is cancelled after.
    ``key``: the API key both send with (one that may ask for the interactive class)."""
    oai = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=5, timeout=60)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": model, "input": "an interactive text", "priority": "interactive"}
    await open_loop(url, rate, 2, body, headers)  # warm-up: the worker measures its pace
    before = engine()
    alone = await open_loop(url, rate, seconds, body, headers)
    use = (engine()["seconds"] - before["seconds"]) / seconds
    texts = long_texts(lines)
    beside = asyncio.create_task(open_loop(url, rate, seconds + 3, body, headers))  # the batch starts while it runs
    sent = time.monotonic()
    batch = await asyncio.to_thread(start_batch, oai, model, {f"line-{i}": [text] for i, text in enumerate(texts)})

    async def completed() -> tuple[float, int, dict[str, float]]:
        found = await asyncio.to_thread(oai.batches.retrieve, batch.id)
        return time.monotonic(), found.request_counts.completed, engine()

    t1, n1, e1 = await completed()
    while n1 == 0:  # validated, and its first engine calls done
        await asyncio.sleep(0.2)
        t1, n1, e1 = await completed()
    shared_outcomes = await beside
    t2, n2, e2 = await completed()
    await asyncio.sleep(seconds / 2)
    t3, n3, e3 = await completed()
    too_short = RuntimeError(f"the batch of {lines} lines ended before the measurement did: give it more lines")
    if n3 >= lines:
        raise too_short
    try:
        await asyncio.to_thread(oai.batches.cancel, batch.id)
    except openai.BadRequestError:  # it completed meanwhile
        raise too_short from None
    shared = shared_outcomes[math.ceil((t1 - sent) * rate) :]  # those sent once the batch ran
    ok_alone = [s for status, s in alone if status == 200]
    ok_shared = [s for status, s in shared if status == 200]
    return BesideBatch(
        alone_p50_s=percentile(ok_alone, 0.5),
        alone_p99_s=percentile(ok_alone, 0.99),
        shared_p50_s=percentile(ok_shared, 0.5),
        shared_p99_s=percentile(ok_shared, 0.99),
        capacity=(n3 - n2) / (t3 - t2),
        interactive_use=use,
        batch=(n2 - n1) / (t2 - t1),
        calls_alone=(e3["inputs"] - e2["inputs"]) / max(1.0, e3["calls"] - e2["calls"]),
        calls_shared=(e2["inputs"] - e1["inputs"]) / max(1.0, e2["calls"] - e1["calls"]),
        line_s=(e3["seconds"] - e2["seconds"]) / max(1.0, e3["inputs"] - e2["inputs"]),
        busy_shared=(e2["seconds"] - e1["seconds"]) / (t2 - t1),
        served_all=len(ok_alone) == len(alone) and all(status == 200 for status, _ in shared_outcomes),
    )
