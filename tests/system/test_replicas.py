"""Two gateway replicas on one Redis, as behind a Kubernetes Service: real processes on loopback.

Worker 1 talks to replica A, worker 2 to replica B, and clients are spread over both, so jobs,
registrations and answers all cross replicas. Then replicas, workers and Redis itself are killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import orjson
import pytest
import redis

from bench.batch import start_batch as start_model_batch
from gateway.redis_link import READS
from tests.system.conftest import REPO, Cluster, Gateway, RedisServer, fake_worker_config, wait_until
from tests.system.load import DIMS, MODEL, Load, expected, metric
from tests.system.test_batches import wait_finished

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def queue_backend() -> str:
    return "redis"  # the cluster's gateways share the session's redis-server


def two_replicas(cluster: Cluster, lease_ttl_s: float = 2, delay_s: float = 0.05) -> tuple[Gateway, Gateway, list]:
    env = {"EMBEDQ_LEASE_TTL_S": str(lease_ttl_s), "EMBEDQ_WORKER_WAIT_S": "5"}
    a, b = cluster.gateway(env=env), cluster.gateway(env=env)
    workers = [cluster.worker(fake_worker_config(g.url, MODEL, dimensions=DIMS, delay_s=delay_s, max_num_seqs=8)) for g in (a, b)]
    for gateway in (a, b):
        wait_until(lambda g=gateway: httpx.get(g.url + "/health").json()["workers"] == 2, 20, "both workers on both replicas")
    return a, b, workers


def _sum_metric(gateways: list[Gateway], name: str) -> float:
    return sum(metric(httpx.get(g.url + "/metrics").text, name) for g in gateways)


def _back_in_line(gateways: list[Gateway]) -> float:
    """Jobs put back in line because their lease expired or their worker departed."""
    return sum(
        _sum_metric(gateways, f'embedq_gateway_leases_reclaimed_total{{action="requeued",reason="{reason}"}}')
        for reason in ("expired", "departed")
    )


def test_clients_on_both_replicas_all_get_answers(cluster: Cluster):
    a, b, _ = two_replicas(cluster)
    assert a.models() == b.models() == [MODEL]
    loads = [Load(g.url, clients=6).start(requests_each=10) for g in (a, b)]
    for load in loads:
        load.join()
        assert load.outcomes == {"200": 60} and not load.wrong, load.summary()
    # Each replica counts its own share; the sums are the totals.
    assert _sum_metric([a, b], 'embedq_gateway_jobs_total{outcome="ok"}') == 120
    assert _sum_metric([a, b], 'embedq_gateway_workers{model="fake-model"}') == 2
    # Queue gauges are at most a second old.
    wait_until(lambda: _sum_metric([a, b], 'embedq_gateway_queue_depth{queue="fake-model"}') == 0, 3, "an empty queue")


def test_a_worker_registered_on_one_replica_is_served_by_the_other_at_once(cluster: Cluster):
    a, b = cluster.gateway(), cluster.gateway()
    cluster.worker(fake_worker_config(a.url, MODEL, dimensions=DIMS))
    a.wait_for_model(MODEL)
    response = httpx.post(b.url + "/v1/embeddings", json={"model": MODEL, "input": "hello"}, timeout=10)
    assert response.status_code == 200, response.text  # no wait for B's periodic refresh
    assert np.array_equal(np.array([response.json()["data"][0]["embedding"]], dtype=np.float32), expected(["hello"]))


def test_kill_9_of_a_replica_loses_no_request_sent_to_the_other(cluster: Cluster):
    a, b, _ = two_replicas(cluster, lease_ttl_s=2, delay_s=0.1)
    on_a = Load(a.url, clients=4, timeout_s=20).start()
    on_b = Load(b.url, clients=8).start(requests_each=10)
    time.sleep(1.0)
    a.proc.stop(signal.SIGKILL)  # with the leases worker 1 took through it, for B's clients too
    on_b.join()
    on_a.join()
    assert on_b.outcomes == {"200": 80} and not on_b.wrong, "sent to the surviving replica: " + on_b.summary()
    assert not on_a.wrong and on_a.outcomes["200"] > 0, on_a.summary()
    assert _back_in_line([b]) >= 1, "the kill did not catch worker 1 holding jobs: " + on_b.summary()


def test_kill_9_of_a_worker_behind_two_replicas_loses_nothing(cluster: Cluster):
    a, b, workers = two_replicas(cluster, lease_ttl_s=2, delay_s=0.2)
    loads = [Load(g.url, clients=6).start(requests_each=8) for g in (a, b)]
    time.sleep(1.0)
    workers[0].stop(signal.SIGKILL)
    for load in loads:
        load.join()
        assert load.outcomes == {"200": 48} and not load.wrong, load.summary()
    assert _sum_metric([a, b], 'embedq_gateway_jobs_total{outcome="ok"}') == 96  # each answered once
    assert _back_in_line([a, b]) >= 1


def test_redis_killed_and_restarted_with_aof_the_system_recovers(cluster: Cluster, tmp_path):
    redis = cluster.redis = RedisServer(tmp_path).start()
    try:
        a, b, _ = two_replicas(cluster, lease_ttl_s=3, delay_s=0.05)
        loads = [Load(g.url, clients=4, timeout_s=30).start() for g in (a, b)]
        time.sleep(1.0)
        redis.stop(signal.SIGKILL)  # no shutdown: up to the last second of writes is lost
        time.sleep(2.0)
        redis.start()
        time.sleep(3.0)
        for load in loads:
            load.join()
        for load in loads:
            assert not load.wrong and set(load.outcomes) <= {"200", "503 queue_unavailable"}, load.summary()
            assert load.outcomes["200"] > 0, load.summary()
        # Recovered: every replica serves again, through both workers, with nothing left hanging.
        after = [Load(g.url, clients=4).start(requests_each=5) for g in (a, b)]
        for load in after:
            load.join()
            assert load.outcomes == {"200": 20} and not load.wrong, "after the restart: " + load.summary()
    finally:
        redis.stop()


def test_a_gateway_started_before_redis_answers_503_then_serves(cluster: Cluster, tmp_path):
    redis = cluster.redis = RedisServer(tmp_path)  # its port is chosen; it is not started yet
    gateway = cluster.gateway()
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_unavailable", response.text
    assert response.headers["retry-after"] == "1"
    redis.start()
    try:
        cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS))
        gateway.wait_for_model(MODEL)
        response = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        redis.stop()
    assert "Traceback" not in cluster.logs()


def test_redis_passwords_are_never_logged(cluster: Cluster, redis_server: RedisServer):
    in_url, in_env = "url-secret-5b1d0c", "env-secret-9f3a77"
    gateway = cluster.gateway(
        env={
            "EMBEDQ_REDIS_URL": redis_server.url.replace("redis://", f"redis://:{in_url}@"),
            "EMBEDQ_REDIS_PASSWORD": in_env,
        }
    )
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=10)
    assert response.status_code == 404, response.text  # no worker: the call went through Redis
    logs = cluster.logs()
    assert f"Redis at redis://:***@127.0.0.1:{redis_server.port}/0" in logs  # the URL, its password masked
    seen = logs + response.text + httpx.get(gateway.url + "/metrics").text
    assert in_url not in seen and in_env not in seen


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMBEDQ_QUEUE": "redis"}, "EMBEDQ_REDIS_URL"),
        ({"EMBEDQ_QUEUE": "redis", "EMBEDQ_REDIS_URL": "redis://127.0.0.1:1/0", "EMBEDQ_KEYS_DB": "k.db"}, "EMBEDQ_KEYS_FILE"),
        ({"EMBEDQ_QUEUE": "rabbitmq"}, "EMBEDQ_QUEUE"),
        ({"EMBEDQ_QUEUE": "redis", "EMBEDQ_REDIS_URL": "redis://h/0", "EMBEDQ_REDIS_PREFIX": "a b"}, "EMBEDQ_REDIS_PREFIX"),
    ],
    ids=["no-url", "sqlite-keys", "unknown-backend", "bad-prefix"],
)
def test_bad_queue_settings_stop_the_gateway_naming_the_variable(env, message):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway"], env={**environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_with_redis_stopped_every_call_is_a_503_naming_no_address_and_all_recovers(cluster: Cluster, tmp_path):
    """What a Redis outage costs each kind of caller: keyed clients with a limit, the admin API,
    the Files and Batches API, the console. One boundary maps Redis failures to 503 with
    Retry-After, in the caller's dialect, without Redis's host or port in any answer."""
    admin = "admin-token-for-the-outage-test"
    redis = cluster.redis = RedisServer(tmp_path).start()
    try:
        gateway = cluster.gateway(env={"EMBEDQ_KEYS_REDIS": "true", "EMBEDQ_ADMIN_TOKENS": admin})
        cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS))
        gateway.wait_for_model(MODEL)
        boss = {"Authorization": f"Bearer {admin}"}
        created = httpx.post(gateway.url + "/admin/v1/keys", json={"name": "team", "rpm": 1000}, headers=boss)
        assert created.status_code == 201, created.text
        auth = {"Authorization": f"Bearer {created.json()['key']}"}
        body = {"model": MODEL, "input": "hello"}
        assert httpx.post(gateway.url + "/v1/embeddings", json=body, headers=auth, timeout=10).status_code == 200
        upload = httpx.post(gateway.url + "/v1/files", headers=auth, data={"purpose": "batch"},
                            files={"file": ("in.jsonl", b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", '
                                                        b'"body": {"model": "fake-model", "input": "x"}}\n')})  # fmt: skip
        assert upload.status_code == 200, upload.text
        file_id = upload.json()["id"]
        console = httpx.Client(base_url=gateway.url, follow_redirects=False)
        assert console.post("/ui/login", data={"token": admin}).status_code == 303
        calls = [
            ("POST", "/v1/embeddings", {"json": body, "headers": auth}),
            ("POST", "/api/embed", {"json": body, "headers": auth}),
            ("POST", "/v1/rerank", {"json": {"model": MODEL, "query": "q", "documents": ["d"]}, "headers": auth}),
            ("GET", "/v1/models", {"headers": auth}),
            ("GET", "/admin/v1/keys", {"headers": boss}),
            ("POST", "/admin/v1/keys", {"json": {"name": "another"}, "headers": boss}),
            ("PATCH", "/admin/v1/keys/team", {"json": {"rpm": 5}, "headers": boss}),
            ("DELETE", "/admin/v1/keys/team", {"headers": boss}),
            ("GET", "/admin/v1/usage", {"headers": boss}),
            ("GET", "/v1/files", {"headers": auth}),
            ("GET", f"/v1/files/{file_id}", {"headers": auth}),
            ("GET", f"/v1/files/{file_id}/content", {"headers": auth}),
            (
                "POST",
                "/v1/batches",
                {"json": {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}, "headers": auth},
            ),  # fmt: skip
            ("GET", "/v1/batches", {"headers": auth}),
        ]
        redis.stop(signal.SIGKILL)
        time.sleep(1.0)
        answers = [(method, path, httpx.request(method, gateway.url + path, timeout=15, **options))
                   for method, path, options in calls]  # fmt: skip
        answers += [("GET", path, console.get(path, timeout=15)) for path in ("/ui/api/fleet", "/ui/api/session")]
        for method, path, response in answers:
            where = f"{method} {path}: {response.status_code} {response.text[:300]}"
            assert response.status_code == 503 or (path == "/v1/models" and response.status_code == 200), where
            assert str(redis.port) not in response.text and "127.0.0.1" not in response.text, where
            if response.status_code == 503:
                assert response.headers.get("retry-after"), where
        redis.start()
        wait_until(lambda: httpx.post(gateway.url + "/v1/embeddings", json=body, headers=auth, timeout=10).status_code == 200,
                   15, "keyed embeddings again")  # fmt: skip
        assert httpx.get(gateway.url + "/admin/v1/keys", headers=boss).status_code == 200
        assert httpx.get(gateway.url + f"/v1/files/{file_id}/content", headers=auth).status_code == 200
        assert console.get("/ui/api/fleet").status_code == 200
        console.close()
    finally:
        redis.stop()
    assert "Traceback" not in cluster.logs()


def test_registrations_a_newer_replica_wrote_are_read_and_an_unreadable_one_is_left_out(cluster: Cluster, redis_server):
    """A rolling upgrade: a newer replica writes fields, and a protocol, this one does not know.
    It used to refuse the record (extra fields forbidden), which ended its registry's refresh."""
    gateway = cluster.gateway()
    cluster.worker(fake_worker_config(gateway.url, MODEL, dimensions=DIMS))
    gateway.wait_for_model(MODEL)
    store = redis.Redis.from_url(redis_server.url)
    hello = {"protocol": 4, "worker_id": "w-newer", "checkpoint_name": "newer", "max_batch_items": 8, "a_new_field": [1],
             "models": {"newer-model": {"max_input_tokens": 64, "dimensions": 8, "a_new_card_field": True}}}  # fmt: skip
    record = {"hello": hello, "session": "0" * 64, "via": "a-newer-replica", "draining": False, "at": time.time(), "more": 1}
    store.set(f"{cluster.prefix}:w:w-newer", orjson.dumps(record), px=30000)
    store.set(f"{cluster.prefix}:w:w-broken", b"{not json", px=30000)
    store.sadd(f"{cluster.prefix}:workers", "w-newer", "w-broken")
    store.close()
    wait_until(lambda: "newer-model" in gateway.models(), 10, "the newer replica's worker listed")
    response = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": "still served"}, timeout=10)
    assert response.status_code == 200, response.text
    assert "w-broken" in gateway.proc.log() and "Traceback" not in gateway.proc.log()


PROTOCOL_2_WORKER = "a6546b5"  # the last commit whose worker speaks protocol 2 only
LANDED_GATEWAY = "888ed64"  # a landed release: protocol 3, and it reads records newer replicas write


def _release(commit: str, where: Path) -> Path:
    """The tree of an earlier commit, unpacked from git (run with this checkout's venv)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
    if archive.returncode != 0:  # a clone without history (CI's is whole): nothing to run the old side from
        pytest.skip(f"git has no commit {commit}: {archive.stderr.decode().strip()}")
    where.mkdir()
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def test_a_fleet_of_two_releases_keeps_serving_through_a_rolling_upgrade(cluster: Cluster, tmp_path):
    """A rolling upgrade, run: a gateway of the landed release and a worker of protocol 2 beside
    current ones on one Redis. (Gateways from before 68d1670 refuse the records newer replicas
    write; that release fixed it, so upgrades start from there.) The current worker talks to the
    old gateway, the protocol-2 worker to the current one; each worker alone then serves clients of
    both replicas with the vectors every fake worker gives, and a batch the current replica drives
    downloads through the old one as JSON lines (frames wait until every replica reads them)."""
    old_gateway_tree, old_worker_tree = (
        _release(LANDED_GATEWAY, tmp_path / "gateway"),
        _release(PROTOCOL_2_WORKER, tmp_path / "worker"),
    )
    assert "PROTOCOL_VERSION = 2" in (old_worker_tree / "contract/messages.py").read_text()
    env = {"EMBEDQ_WORKER_WAIT_S": "5"}
    new_gateway, old_gateway = cluster.gateway(env=env), cluster.gateway(env=env, source=old_gateway_tree)
    config = fake_worker_config(old_gateway.url, MODEL, dimensions=DIMS, delay_s=0.02)
    new_worker = cluster.worker(config)
    old_worker = cluster.worker(fake_worker_config(new_gateway.url, MODEL, dimensions=DIMS, delay_s=0.02), source=old_worker_tree)

    def serving(workers: int) -> None:
        for g in (new_gateway, old_gateway):
            wait_until(lambda g=g: httpx.get(g.url + "/health").json()["workers"] == workers, 30,
                       f"{workers} workers on {g.url}\n{cluster.logs()[-6000:]}")  # fmt: skip
        for i in range(12):
            texts = [f"mixed fleet {workers} {i} {j}" for j in range(1 + i % 3)]
            gateway = (new_gateway, old_gateway)[i % 2]
            answer = httpx.post(gateway.url + "/v1/embeddings", json={"model": MODEL, "input": texts}, timeout=30)
            assert answer.status_code == 200, f"{gateway.url}: {answer.text}\n{cluster.logs()[-6000:]}"
            vectors = np.array([d["embedding"] for d in answer.json()["data"]], dtype=np.float32)
            assert np.array_equal(vectors, expected(texts)), gateway.url

    serving(workers=2)
    store = redis.Redis.from_url(cluster.redis.url)
    reads = sorted(store.mget(list(store.scan_iter(f"{cluster.prefix}:alive:*"))))
    store.close()
    assert reads == [b"1", str(READS).encode()], reads  # the old tree ran (its replica reads no frames), not this one twice
    lines = {f"line-{i}": [f"batch text {i}"] for i in range(40)}
    oai = openai.OpenAI(base_url=new_gateway.url + "/v1", api_key="unused", max_retries=0)
    batch = wait_finished(oai, start_model_batch(oai, MODEL, lines).id)
    assert batch.status == "completed" and batch.request_counts.completed == 40, batch
    downloads = [openai.OpenAI(base_url=g.url + "/v1", api_key="unused").files.content(batch.output_file_id).content
                 for g in (new_gateway, old_gateway)]  # fmt: skip
    assert downloads[0] == downloads[1] and len([orjson.loads(line) for line in downloads[1].splitlines()]) == 40
    assert f"batch {batch.id} completed" in cluster.procs[0].log(), "the current replica drove it"
    new_worker.stop()  # the protocol-2 worker alone, through the current gateway
    serving(workers=1)
    new_worker = cluster.worker(config)
    serving(workers=2)
    old_worker.stop()  # the current worker alone, through the old gateway
    serving(workers=1)
    assert "Traceback" not in cluster.logs()
