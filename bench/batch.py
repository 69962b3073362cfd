"""A batch beside interactive traffic: what it costs the interactive requests, and how much of the
idle capacity it gets. One fake worker at a fixed pace; interactive 1-input requests at a fixed
rate (an open loop), alone, then with a 50,000-line batch running. The same measurement is asserted
by ``tests/system/test_batches.py`` and reported by ``make bench``."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import asdict, dataclass

import openai
import orjson

from bench.load import open_loop, percentile


@dataclass
class BesideBatch:
    alone_p99_s: float  # interactive p99 without the batch
    shared_p99_s: float  # the same load with the batch running
    capacity: float  # lines per second the batch gets alone (1 input each)
    interactive: float  # interactive requests per second served beside it
    batch: float  # lines per second the batch got beside the interactive load
    served_all: bool  # every interactive request answered 200

    @property
    def p99_ratio(self) -> float:
        return self.shared_p99_s / self.alone_p99_s

    @property
    def batch_share(self) -> float:
        """The batch's rate over the capacity the interactive load leaves idle."""
        return self.batch / (self.capacity - self.interactive)

    def as_dict(self) -> dict:
        return {**asdict(self), "p99_ratio": self.p99_ratio, "batch_share": self.batch_share}

    def summary(self) -> str:
        return (
            f"interactive p99 alone {self.alone_p99_s * 1000:.0f} ms, beside the batch {self.shared_p99_s * 1000:.0f} ms "
            f"({self.p99_ratio:.2f}x); batch {self.batch:.1f} lines/s of {self.capacity - self.interactive:.1f} idle "
            f"({self.batch_share:.0%}; capacity {self.capacity:.1f}/s)"
        )


def start_batch(oai: openai.OpenAI, model: str, lines: dict[str, list[str]]):
    content = b"".join(
        orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": texts}})
        + b"\n"
        for cid, texts in lines.items()
    )
    uploaded = oai.files.create(file=("corpus.jsonl", io.BytesIO(content)), purpose="batch")
    return oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")


async def beside_batch(url: str, model: str, rate: float, seconds: float, lines: int = 50_000) -> BesideBatch:
    """Interactive alone; the batch alone (the capacity); both. The batch is cancelled after."""
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=5, timeout=60)
    body = {"model": model, "input": "an interactive text"}
    alone = await open_loop(url, rate, seconds, body, {})
    batch = await asyncio.to_thread(start_batch, oai, model, {f"line-{i}": [f"batch text {i}"] for i in range(lines)})

    async def completed() -> tuple[float, int]:
        found = await asyncio.to_thread(oai.batches.retrieve, batch.id)
        return time.monotonic(), found.request_counts.completed

    await asyncio.sleep(5)  # validated, and its window filled
    t0, n0 = await completed()
    await asyncio.sleep(seconds / 2)
    t1, n1 = await completed()
    shared = await open_loop(url, rate, seconds, body, {})
    t2, n2 = await completed()
    await asyncio.to_thread(oai.batches.cancel, batch.id)
    ok_alone = [s for status, s in alone if status == 200]
    ok_shared = [s for status, s in shared if status == 200]
    return BesideBatch(
        alone_p99_s=percentile(ok_alone, 0.99),
        shared_p99_s=percentile(ok_shared, 0.99),
        capacity=(n1 - n0) / (t1 - t0),
        interactive=len(ok_shared) / seconds,
        batch=(n2 - n1) / (t2 - t1),
        served_all=len(ok_alone) == len(alone) and len(ok_shared) == len(shared),
    )
