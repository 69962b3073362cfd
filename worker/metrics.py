"""The worker's Prometheus metrics, all prefixed ``embedq_worker_``, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        p = "embedq_worker_"
        self.ready = Gauge(p + "ready", "1 once the engine is loaded and the worker is leasing", registry=registry)
        self.jobs = Counter(p + "jobs_total", "Jobs finished, by outcome (ok or an error code)", ["outcome"], registry=registry)
        self.inputs = Counter(p + "inputs_total", "Inputs embedded by the engine", registry=registry)
        self.tokens = Counter(p + "tokens_total", "Prompt tokens embedded by the engine", registry=registry)
        self.batch_size = Histogram(p + "batch_inputs", "Inputs per engine call", buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.engine_seconds = Histogram(
            p + "engine_seconds", "Time per engine call (tokenize + embed)", buckets=SECONDS_BUCKETS, registry=registry
        )
        self.leases = Counter(p + "leases_total", "Lease calls, by whether they returned jobs", ["result"], registry=registry)
        self.http_retries = Counter(
            p + "http_retries_total", "Gateway calls retried after a transport error, 5xx or 429", registry=registry
        )
        self.gateway_errors = Counter(
            p + "gateway_unreachable_total", "Gateway calls that failed after every retry", registry=registry
        )
        self.stale_posts = Counter(
            p + "stale_posts_total", "Posted results or errors the gateway ignored (lease expired)", registry=registry
        )
        self.tcp_probe_up = Gauge(
            p + "tcp_probe_up", "1 if the [monitoring] tcp_probes target accepts connections", ["target"], registry=registry
        )
