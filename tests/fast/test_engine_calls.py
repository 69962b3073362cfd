"""How the worker's engine calls are formed, on the fake engine's real-shaped cost (a fixed part
per call plus a part per token): full when only bulk work is about, short while interactive work
arrives, and never lengthened by bulk work when an interactive job rides in them. What these do to
latency and throughput is measured in ``make bench`` (and on real vLLM), not here."""

from __future__ import annotations

import asyncio

import pytest

from bench.load import long_texts
from tests.fast.conftest import running

pytestmark = pytest.mark.anyio
SHORT = 6  # tokens of "an interactive text N" on the fake engine: four words and two specials


async def test_calls_are_full_for_bulk_alone_and_short_while_interactive_work_arrives():
    async with running() as gateway:
        fake = await gateway.worker(max_model_len=256)
        texts = long_texts(400)  # about 180 tokens each: 9 ms of the fake engine's time apiece
        bulk = [asyncio.create_task(gateway.embed(text, priority="batch")) for text in texts]
        await gateway.until(lambda: len(fake.engine.calls) >= 4, "the bulk's first calls")
        alone = list(fake.engine.calls[1:])  # the first is made before the worker knows its pace
        started = len(fake.engine.calls)
        for n in range(20):
            response = await gateway.embed(f"an interactive text {n}", priority="interactive")
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.03)
        beside = fake.engine.calls[started + 2 :]  # from when the worker heard of interactive work
        assert all(response.status_code == 200 for response in await asyncio.gather(*bulk))
    assert min(map(len, alone)) >= 8, alone  # full: 20 times the fixed part of a call, about 11 of these texts
    # Half the interactive objective (50 ms) holds 7 ms and about four of these texts.
    assert max(map(len, beside)) <= 5, beside
    with_interactive = [call for call in beside if SHORT in call]
    assert len(with_interactive) >= 15 and all(max(call) == SHORT for call in with_interactive), beside
