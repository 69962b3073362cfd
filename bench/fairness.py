"""A light key beside a flooding one: what the flood costs the light key's latency. One fake
worker at a fixed pace; key A sends at 10x its capacity, key B 2 requests/s; B alone first, then
both. The same measurement is asserted by ``tests/system/test_tenancy.py`` and reported by
``make bench``."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import httpx

from bench.load import open_loop, percentile

SECONDS = 20
LIGHT_RATE = 2


@dataclass
class BesideFlood:
    alone_p50_s: float  # B alone
    alone_p99_s: float
    shared_p50_s: float  # B beside A's flood
    shared_p99_s: float
    light_statuses: list[int]  # B's answers, alone and beside the flood
    flood_statuses: list[int]  # A's

    @property
    def p99_ratio(self) -> float:
        return self.shared_p99_s / self.alone_p99_s

    def as_dict(self) -> dict:
        figures = {k: v for k, v in asdict(self).items() if not k.endswith("statuses")}
        return {**figures, "p99_ratio": self.p99_ratio, "flood_served": self.flood_statuses.count(200),
                "flood_429": self.flood_statuses.count(429)}  # fmt: skip

    def summary(self) -> str:
        return (
            f"B p50/p99 alone {self.alone_p50_s * 1000:.0f}/{self.alone_p99_s * 1000:.0f} ms, beside the flood "
            f"{self.shared_p50_s * 1000:.0f}/{self.shared_p99_s * 1000:.0f} ms ({self.p99_ratio:.2f}x at p99); "
            f"A: {self.flood_statuses.count(200)} served, {self.flood_statuses.count(429)} 429s"
        )


def create_key(url: str, admin_token: str, name: str) -> str:
    response = httpx.post(url + "/admin/v1/keys", json={"name": name}, headers={"Authorization": f"Bearer {admin_token}"})
    assert response.status_code == 201, response.text
    return response.json()["key"]


async def light_beside_flood(url: str, model: str, admin_token: str, flood_rate: float) -> BesideFlood:
    flood = {"Authorization": f"Bearer {create_key(url, admin_token, 'flood')}"}
    light = {"Authorization": f"Bearer {create_key(url, admin_token, 'light')}"}
    body = {"model": model, "input": "a text"}
    alone = await open_loop(url, LIGHT_RATE, SECONDS / 2, body, light)
    flooded, shared = await asyncio.gather(
        open_loop(url, flood_rate, SECONDS, body, flood), open_loop(url, LIGHT_RATE, SECONDS, body, light)
    )
    b_alone = [s for status, s in alone if status == 200]
    b_shared = [s for status, s in shared if status == 200]
    return BesideFlood(
        alone_p50_s=percentile(b_alone, 0.5),
        alone_p99_s=percentile(b_alone, 0.99),
        shared_p50_s=percentile(b_shared, 0.5),
        shared_p99_s=percentile(b_shared, 0.99),
        light_statuses=[status for status, _ in alone + shared],
        flood_statuses=[status for status, _ in flooded],
    )
