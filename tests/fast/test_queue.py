"""The queue core's promises on the memory store (the cases are in ``tests/queue_cases.py``; the
system tier runs the same ones on Redis)."""

from __future__ import annotations

import pytest

from gateway.queue import MemoryStore
from tests.queue_cases import *  # noqa: F403  (the cases, collected here)
from tests.queue_cases import Backend


class MemoryBackend(Backend):
    async def store(self) -> MemoryStore:
        return MemoryStore()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()
