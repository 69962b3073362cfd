"""The worker registry: which workers are alive, stuck or gone, and which models they serve. The
view lives in this process (``local.py``); with several replicas it is shared through Redis
(``redis.py``)."""

from gateway.registry.local import Route, UnknownWorker, WorkerRegistry, WorkerView
from gateway.registry.redis import RedisRegistry

__all__ = ["RedisRegistry", "Route", "UnknownWorker", "WorkerRegistry", "WorkerView"]
