"""A light key beside a flooding one, both in the interactive class: what the flood costs the light
key's latency. One worker; key B sends 2 short requests a second (an open loop), alone first; then
key A floods the worker with 32 closed-loop clients of 16 long texts each while B goes on. The
promise: B's p99 beside the flood is at most its p99 alone plus the interactive objective (the
most an interactive job waits for others' engine time), and A gets what is left, with no 5xx. The
same measurement is asserted by ``tests/system/test_tenancy.py`` and reported by ``make bench``."""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import asdict, dataclass

import httpx

from bench.batch import Counters
from bench.load import closed_loop, long_texts, open_loop, percentile

LIGHT_RATE = 2
FLOOD_CLIENTS, FLOOD_INPUTS = 32, 16


@dataclass
class BesideFlood:
    alone_p50_s: float  # B alone
    alone_p99_s: float
    shared_p50_s: float  # B beside A's flood
    shared_p90_s: float
    shared_p99_s: float
    light_statuses: list[int]  # B's answers, alone and beside the flood
    flood_statuses: list[int]  # A's
    flood_inputs_per_s: float  # what A got
    input_s: float  # engine seconds per input beside the flood (NaN: the engine's counters not given)

    @property
    def p99_added_s(self) -> float:
        return self.shared_p99_s - self.alone_p99_s

    def as_dict(self) -> dict:
        figures = {k: v for k, v in asdict(self).items() if not k.endswith("statuses")}
        return {**figures, "p99_added_s": self.p99_added_s, "flood_served": self.flood_statuses.count(200),
                "flood_429": self.flood_statuses.count(429)}  # fmt: skip

    def summary(self) -> str:
        return (
            f"B p50/p99 alone {self.alone_p50_s * 1000:.0f}/{self.alone_p99_s * 1000:.0f} ms, beside the flood "
            f"{self.shared_p50_s * 1000:.0f}/{self.shared_p90_s * 1000:.0f}/{self.shared_p99_s * 1000:.0f} ms at p50/p90/p99 "
            f"(+{self.p99_added_s * 1000:.0f} ms at p99); "
            f"A: {self.flood_statuses.count(200)} served ({self.flood_inputs_per_s:.1f} inputs/s), "
            f"{self.flood_statuses.count(429)} 429s, other statuses {sorted(set(self.flood_statuses) - {200, 429})}"
        )


def create_key(url: str, admin_token: str, name: str) -> str:
    """A key that may ask for the interactive class."""
    response = httpx.post(url + "/admin/v1/keys", json={"name": name, "max_priority": "interactive"},
                          headers={"Authorization": f"Bearer {admin_token}"})  # fmt: skip
    assert response.status_code == 201, response.text
    return response.json()["key"]


async def light_beside_flood(
    url: str, model: str, admin_token: str, seconds: float = 20, engine: Counters | None = None
) -> BesideFlood:
    flood = {"Authorization": f"Bearer {create_key(url, admin_token, 'flood')}"}
    light = {"Authorization": f"Bearer {create_key(url, admin_token, 'light')}"}
    body = {"model": model, "input": "a text", "priority": "interactive"}
    texts = itertools.cycle(long_texts(512))
    bodies = ({"model": model, "input": [next(texts) for _ in range(FLOOD_INPUTS)], "priority": "interactive",
               "encoding_format": "base64"} for _ in itertools.count())  # fmt: skip
    await open_loop(url, LIGHT_RATE, 2, body, light)  # warm-up: the worker measures its pace
    alone = await open_loop(url, LIGHT_RATE, seconds / 2, body, light)
    before = engine() if engine else None
    flooded, shared = await asyncio.gather(
        closed_loop(url, bodies, FLOOD_CLIENTS, seconds, flood), open_loop(url, LIGHT_RATE, seconds, body, light)
    )
    after = engine() if engine else None
    b_alone = [s for status, s in alone if status == 200]
    b_shared = [s for status, s in shared if status == 200]
    return BesideFlood(
        alone_p50_s=percentile(b_alone, 0.5),
        alone_p99_s=percentile(b_alone, 0.99),
        shared_p50_s=percentile(b_shared, 0.5),
        shared_p90_s=percentile(b_shared, 0.9),
        shared_p99_s=percentile(b_shared, 0.99),
        light_statuses=[status for status, _ in alone + shared],
        flood_statuses=[status for status, _ in flooded],
        flood_inputs_per_s=[status for status, _ in flooded].count(200) * FLOOD_INPUTS / seconds,
        input_s=(after["seconds"] - before["seconds"]) / max(1.0, after["inputs"] - before["inputs"])
        if before and after
        else math.nan,
    )
