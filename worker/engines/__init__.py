"""The engines a worker can run, behind one interface (``base.py``): real vLLM
(``vllm_engine.py``, the only module that imports vllm, and only when chosen) and a
deterministic fake for tests and load tests (``fake.py``)."""

from __future__ import annotations

from worker.config import FakeGenerator, VllmGenerator
from worker.engines.base import Engine, EngineInfo
from worker.engines.fake import FakeEngine

__all__ = ["Engine", "EngineInfo", "FakeEngine", "build_engine"]


def build_engine(generator: FakeGenerator | VllmGenerator) -> Engine:
    if isinstance(generator, FakeGenerator):
        return FakeEngine(generator)
    from worker.engines.vllm_engine import VllmEngine  # imports vllm: seconds, and only when asked for

    return VllmEngine(generator)
