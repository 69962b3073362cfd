"""What both tiers share about fake workers: their config.toml, and the vectors they must
answer (the fake engine is deterministic: same text, same vector, on every worker)."""

from __future__ import annotations

import re

import numpy as np

from worker.config import FakeGenerator
from worker.engines import FakeEngine

MODEL, DIMS, MAX_LEN = "fake-model", 16, 64


def fake_worker_config(
    gateway_url: str,
    model: str = MODEL,
    *,
    dimensions: int = DIMS,
    delay_s: float = 0.0,
    metrics_port: int = 0,
    token: str = "",
    max_model_len: int = MAX_LEN,
    max_num_seqs: int = 64,
    tags: tuple[str, ...] = (),
    model_extra: str = "",
    generator_extra: str = "",
    queue_extra: str = "",
    quick: bool = True,
) -> str:
    """A fake worker's config. ``quick``: heartbeats, long-polls and retries shortened for tests;
    without it, the queue table holds only what an operator must write (every default applies)."""
    tuning = "http_request_retries = 2\nlease_wait_s = 2.0\nheartbeat_interval_s = 0.5\n" if quick else ""
    return f"""
edition = 1
[generator]
type = "fake"
dimensions = {dimensions}
delay_s = {delay_s}
max_model_len = {max_model_len}
max_num_seqs = {max_num_seqs}
{generator_extra}
[queue]
url = "{gateway_url}"
token = "{token}"
checkpoint_name = "{model}"
tags = [{", ".join(f'"{t}"' for t in tags)}]
{tuning}{queue_extra}
[queue.models."{model}"]
description = "deterministic fake vectors"
{model_extra}
[monitoring]
metrics_port = {metrics_port}
"""


def expected(texts: list[str], dimensions: int = DIMS) -> np.ndarray:
    """What any fake worker answers for these texts."""
    engine = FakeEngine(FakeGenerator(type="fake", dimensions=dimensions, max_model_len=MAX_LEN))
    return engine.embed(engine.tokenize(texts))


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus exposition, by its full name with labels: 0 if that sample is
    absent, an error if the metric itself is (a renamed metric must not read as a quiet zero)."""
    family = name.partition("{")[0]
    if not re.search(rf"(?m)^# TYPE ({re.escape(family)}|{re.escape(family.removesuffix('_total'))}) ", text):
        raise AssertionError(f"no metric {family} in the exposition")
    match = re.search(rf"(?m)^{re.escape(name)} (\S+)$", text)
    return float(match.group(1)) if match else 0.0
