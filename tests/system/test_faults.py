"""Fault injection with real processes: every accepted request gets exactly one answer, its
vectors or a clear error, whatever happens to workers and gateways.

Each test states its numbers (sent, completed, failed by reason) in its assertion messages.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.system.conftest import Cluster, fake_worker_config, free_port, wait_until
from tests.system.load import DIMS, MODEL, Load, metric

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=["memory", "redis"])
def queue_backend(request) -> str:
    """Every test of this module runs on both queue backends."""
    return request.param


def two_workers(cluster: Cluster, lease_ttl_s: float, delay_s: float):
    """A gateway and two fake workers on MODEL; returns the gateway and the first worker."""
    gateway = cluster.gateway(env={"EMBEDQ_LEASE_TTL_S": str(lease_ttl_s)})
    first = cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=delay_s, max_num_seqs=8))
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=delay_s, max_num_seqs=8))
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 2, 20, "two workers")
    return gateway, first


@pytest.mark.parametrize("fault", ["kill -9", "SIGSTOP", "engine hangs"])
def test_a_worker_lost_mid_load_on_default_settings_loses_nothing(cluster: Cluster, fault: str):
    """Defaults are what people run: no setting of the gateway or the workers is shortened. One of
    two workers dies, freezes, or its engine hangs while its process heart-beats; every request
    is answered with its vectors, well before the request timeout."""
    gateway = cluster.gateway(defaults=True)
    extra = "hang_after_batches = 40" if fault == "engine hangs" else ""
    victim = cluster.worker(fake_worker_config(gateway.url, delay_s=0.05, max_num_seqs=16, generator_extra=extra, quick=False))
    cluster.worker(fake_worker_config(gateway.url, delay_s=0.05, max_num_seqs=16, quick=False))
    wait_until(lambda: httpx.get(gateway.url + "/health").json()["workers"] == 2, 30, "two workers")
    load = Load(gateway.url, clients=32, inputs=4).start(total=400)
    if fault != "engine hangs":  # that one hangs by itself, after 40 batches
        time.sleep(0.3)
        victim.popen.send_signal(signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
    load.join()
    metrics = httpx.get(gateway.url + "/metrics").text
    back = {
        reason: metric(metrics, f'embedq_gateway_leases_reclaimed_total{{action="requeued",reason="{reason}"}}')
        for reason in ("departed", "expired")
    }
    summary = load.summary() + f"; jobs back in line: {back}"
    victim.popen.kill()  # a frozen or hung one would sit out its drain at teardown
    assert load.outcomes == {"200": 400} and not load.wrong, summary
    assert load.slowest_s <= 10 + 10, f"slower than the worker TTL + 10 s: {summary}"
    # Whichever comes first brings them back: the victim's sized leases expiring, or the registry dropping it.
    assert sum(back.values()) >= 1, f"the fault missed the victim's jobs: {summary}"


def test_gateway_down_10s_then_back_workers_recover_by_themselves(cluster: Cluster):
    port = free_port()
    gateway = cluster.gateway(port=port)
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS))
    gateway.wait_for_model(MODEL)
    gateway.proc.stop(signal.SIGTERM)
    time.sleep(10)
    restarted = cluster.gateway(port=port)
    back = time.monotonic()
    restarted.wait_for_model(MODEL, timeout_s=15)
    recovered_s = time.monotonic() - back
    response = httpx.post(restarted.url + "/v1/embeddings", json={"model": MODEL, "input": ["back again"]}, timeout=10)
    assert response.status_code == 200, response.text
    assert recovered_s < 8, f"the worker took {recovered_s:.1f}s to come back"
    assert cluster.procs[1].popen.poll() is None, "the worker died while the gateway was away"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])


def test_three_times_capacity_gets_429s_and_recovers(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_MAX_QUEUED_REQUESTS": "8", "EMBEDQ_RETRY_AFTER_S": "2"})
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.1, max_num_seqs=4))
    gateway.wait_for_model(MODEL)
    Load(gateway.url, clients=4, inputs=1).start(requests_each=5).join()  # warm up
    rss_before = _rss_kib(gateway.proc.popen.pid)
    overload = Load(gateway.url, clients=24, inputs=1).start()  # 3x the 8 requests the queue admits
    time.sleep(4)
    overload.join()
    rss_after = _rss_kib(gateway.proc.popen.pid)
    summary = overload.summary() + f"; gateway RSS {rss_before} -> {rss_after} KiB"
    assert set(overload.outcomes) == {"200", "429 overloaded"} and not overload.wrong, summary
    assert overload.outcomes["429 overloaded"] > 0 and overload.outcomes["200"] > 0, summary
    assert rss_after - rss_before < 30 * 1024, summary
    refused = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert refused.status_code == 200  # the load is gone: served again
    started = time.monotonic()
    after = Load(gateway.url, clients=4, inputs=1).start(requests_each=5).join()
    assert after.outcomes == {"200": 20}, after.summary()
    assert time.monotonic() - started < 5, "throughput did not return to normal"


def test_429_carries_retry_after(cluster: Cluster):
    gateway = cluster.gateway(env={"EMBEDQ_MAX_QUEUED_REQUESTS": "1", "EMBEDQ_RETRY_AFTER_S": "3"})
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=1.0))
    gateway.wait_for_model(MODEL)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "slow"}, timeout=10)
        wait_until(
            lambda: metric(httpx.get(gateway.url + "/metrics").text, "embedq_gateway_requests_in_flight") == 1,
            5,
            "the first request to be in flight",
        )
        for path, body in (("/v1/embeddings", {"model": MODEL, "input": "x"}), ("/api/embed", {"model": MODEL, "input": "x"})):
            refused = httpx.post(gateway.url + path, json=body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "3", refused.text
        assert first.result().status_code == 200


def test_a_poisoned_input_fails_alone(cluster: Cluster):
    gateway = cluster.gateway()
    cluster.worker(
        fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.3, model_extra="", max_num_seqs=64).replace(
            'type = "fake"', 'type = "fake"\npoison = "POISON"'
        )
    )
    gateway.wait_for_model(MODEL)
    texts = ["healthy one", "this is POISON for the engine", "healthy two", "healthy three"]
    with ThreadPoolExecutor(len(texts)) as pool:  # sent together, so they share a batch
        responses = list(
            pool.map(
                lambda t: httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": ["ok", t]}, timeout=10), texts
            )
        )
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 500, 200, 200], statuses
    error = responses[1].json()["error"]
    assert error["code"] == "engine_error" and "input" in error["message"] and "Traceback" not in error["message"]
    after = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "the next request"}, timeout=10)
    assert after.status_code == 200 and httpx.get(gateway.url + "/health").json()["workers"] == 1


def test_a_dead_engine_gives_its_jobs_back_and_its_worker_exits_non_zero(cluster: Cluster):
    # A supervisor restarts the worker: its model may be without a worker for a few seconds.
    gateway = cluster.gateway(env={"EMBEDQ_LEASE_TTL_S": "30", "EMBEDQ_WORKER_WAIT_S": "15"})
    doomed = cluster.worker(
        fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.05).replace(
            'type = "fake"', 'type = "fake"\ndead_after_batches = 3'
        )
    )
    gateway.wait_for_model(MODEL)
    started = time.monotonic()
    load = Load(gateway.url, clients=4).start(requests_each=3)
    wait_until(lambda: doomed.popen.poll() is not None, 20, "the worker with the dead engine to exit")
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS))  # its replacement
    load.join()
    took_s = time.monotonic() - started
    assert doomed.popen.returncode == 3, doomed.log()
    assert "giving back" in doomed.log()
    assert load.outcomes == {"200": 12} and not load.wrong, load.summary()
    # The given-back jobs were served by the replacement long before their 30 s lease expired.
    assert took_s < 15, f"{load.summary()} in {took_s:.1f}s"


def test_sigterm_on_a_worker_under_load_loses_nothing(cluster: Cluster):
    gateway, leaving = two_workers(cluster, lease_ttl_s=30, delay_s=0.3)
    load = Load(gateway.url, clients=8).start(requests_each=8)
    time.sleep(1.0)
    started = time.monotonic()
    code = leaving.stop(signal.SIGTERM)
    drained_s = time.monotonic() - started
    load.join()
    metrics = httpx.get(gateway.url + "/metrics").text
    summary = load.summary() + f"; worker exit {code} after {drained_s:.1f}s"
    assert code == 0 and drained_s < 5, summary
    assert load.outcomes == {"200": 64} and not load.wrong, summary
    # Nothing had to wait for a lease to expire: the leaving worker answered what it held.
    for reason in ("expired", "departed"):
        assert metric(metrics, f'embedq_gateway_leases_reclaimed_total{{action="requeued",reason="{reason}"}}') == 0, summary
    assert metric(metrics, 'embedq_gateway_worker_posts_total{result="ignored"}') == 0, summary


def test_sigterm_on_the_gateway_answers_what_it_accepted(cluster: Cluster):
    gateway = cluster.gateway()
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS, delay_s=0.3, max_num_seqs=8))
    gateway.wait_for_model(MODEL)
    load = Load(gateway.url, clients=12).start()
    time.sleep(1.5)
    in_flight = metric(httpx.get(gateway.url + "/metrics").text, "embedq_gateway_requests_in_flight")
    gateway.proc.popen.send_signal(signal.SIGTERM)
    wait_until(lambda: gateway.proc.popen.poll() is not None, 30, "the gateway to exit")
    load.join()
    summary = load.summary() + f"; {in_flight:g} in flight at SIGTERM"
    # Refused, never accepted: a 503 while draining, or no connection (refused, or a connection
    # closed or reset at exit before its request reached the app; the log checks below prove
    # that everything that did reach the app was answered).
    refused = ("503 shutting_down", "connection refused", "RemoteProtocolError", "ReadError")
    lost = {k: v for k, v in load.outcomes.items() if k != "200" and k not in refused}
    assert not lost and not load.wrong, "accepted requests were lost: " + summary
    assert load.outcomes["200"] >= in_flight > 0, summary
    # Every request that reached the app was answered: no drain timeout, no task cut at exit.
    log = gateway.proc.log()
    assert "drain timed out" not in log and "Cancel" not in log, summary
