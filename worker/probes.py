"""``[monitoring] tcp_probes``: can this worker reach the things it depends on?

Each "host:port" target is connected to every heartbeat interval; the result is the gauge
``embedq_worker_tcp_probe_up{target=...}`` (1 reachable, 0 not), for alerting on a node that
lost its route to, say, a model store or a proxy.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge

CONNECT_TIMEOUT_S = 2.0


async def probe(target: str) -> bool:
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), CONNECT_TIMEOUT_S)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def probe_all(targets: list[str], gauge: Gauge) -> None:
    results = await asyncio.gather(*(probe(t) for t in targets))
    for target, up in zip(targets, results):
        gauge.labels(target).set(1 if up else 0)
