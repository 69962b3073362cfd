"""The gateway's Prometheus metrics, all prefixed ``embedq_gateway_``, on an injected registry.

Queue depth, oldest-job age and workers per model are read from the queue and the worker
registry at scrape time. With several replicas each counts its own share (its clients' jobs, the
workers whose last heartbeat came to it), so that summing over replicas gives the totals.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.queue import JobQueue, Reason, Reclaimed
from gateway.registry import WorkerRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INPUT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
PREFIX = "embedq_gateway_"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry):
        self._children: dict = {}
        self._refused_series: set[tuple[str, str]] = set()
        p = PREFIX
        self.requests = Counter(
            p + "requests_total",
            "Client requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            p + "request_seconds", "Client request latency, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.request_inputs = Histogram(
            p + "request_inputs", "Inputs per embeddings request", buckets=INPUT_BUCKETS, registry=registry
        )
        self.inputs = Counter(p + "inputs_total", "Inputs embedded, by model", ["model"], registry=registry)
        self.loop_restarts = Counter(
            p + "loop_restarts_total", "Background loops started again after a failure (loops.py)", ["loop"], registry=registry
        )
        self.tokens = Counter(p + "tokens_total", "Prompt tokens embedded, by model", ["model"], registry=registry)
        self.key_requests = Counter(
            p + "key_requests_total", "Embeddings requests answered, by API key name", ["key"], registry=registry
        )
        self.key_tokens = Counter(p + "key_tokens_total", "Prompt tokens embedded, by API key name", ["key"], registry=registry)
        self.jobs = Counter(
            p + "jobs_total", "Jobs finished, by outcome (ok, or the failure code)", ["outcome"], registry=registry
        )
        self.rejected = Counter(
            p + "rejected_total", "Requests refused with 429 because the model's queue was full", ["model"], registry=registry
        )
        self.batch_lines = Counter(
            p + "batch_lines_total",
            "Batch lines put in their model's queue (queued), and answered (completed or failed), by model",
            ["model", "state"],
            registry=registry,
        )
        self.batch_backlog = Gauge(
            p + "batch_backlog_lines", "Lines of the batches this replica drives still to answer, by model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(p + "requests_in_flight", "Client requests being served", registry=registry)
        self.leases_reclaimed = Counter(
            p + "leases_reclaimed_total",
            "Leases that ended unanswered, by why (expired, or their worker departed) and what became of the job",
            ["reason", "action"],
            registry=registry,
        )
        self.worker_posts = Counter(
            p + "worker_posts_total",
            "Job answers posted by workers: accepted, ignored (a stale lease) or refused (wrong for the job)",
            ["result"],
            registry=registry,
        )
        self.answers_refused = Counter(
            p + "answers_refused_total",
            "Answers refused because they were wrong for their job, by worker and problem",
            ["worker", "problem"],
            registry=registry,
        )

    def child(self, metric, *labels: str):
        """metric.labels(*labels), cached: labels() locks and validates on every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def refused(self, worker_id: str, problem: str) -> None:
        self.answers_refused.labels(worker_id, problem).inc()
        self._refused_series.add((worker_id, problem))

    def forget_worker(self, worker_id: str) -> None:
        """A departed worker's series go with it: worker ids come and go, series would pile up."""
        for series in [s for s in self._refused_series if s[0] == worker_id]:
            self.answers_refused.remove(*series)
            self._refused_series.discard(series)

    def on_reclaimed(self, reason: Reason, reclaimed: Reclaimed) -> None:
        self.leases_reclaimed.labels(reason, "requeued").inc(reclaimed.requeued)
        self.leases_reclaimed.labels(reason, "failed").inc(reclaimed.failed)


class LiveStateCollector(Collector):
    """Gauges computed from the queue and the registry whenever /metrics is scraped."""

    def __init__(self, queue: JobQueue, workers: WorkerRegistry):
        self._queue = queue
        self._workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Jobs waiting for a worker", labels=["queue"])
        leased = GaugeMetricFamily(PREFIX + "jobs_leased", "Jobs held by a worker", labels=["queue"])
        age = GaugeMetricFamily(PREFIX + "queue_oldest_age_seconds", "Age of the oldest waiting job", labels=["queue"])
        for key, stats in self._queue.stats().items():
            depth.add_metric([key], stats.depth)
            leased.add_metric([key], stats.leased)
            age.add_metric([key], stats.oldest_age_s)
        workers = GaugeMetricFamily(
            PREFIX + "workers", "Live workers, by model (those whose last heartbeat came to this replica)", labels=["model"]
        )
        for name, route in self._workers.routes(own_only=True).items():
            workers.add_metric([name], route.workers)
        yield from (depth, leased, age, workers)
