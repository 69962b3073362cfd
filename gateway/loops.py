"""The gateway's background loops, kept running: one supervisor for all of them.

Lease expiry, result collection, wake-ups, the registry's refresh, usage, keys, batches: each is
a coroutine that runs while the gateway serves, started with ``Loops.keep(name, forever)``. Each
catches what it expects (Redis unreachable, a store locked) and goes on; anything else used to
end it silently while ``/health`` stayed 200. Now an exception other than cancellation is logged
with its traceback, counted (``embedq_gateway_loop_restarts_total{loop}``) and the loop starts
again after a pause: 0.1 s, doubled at each failure in a row up to 10 s, and back to 0.1 s once it
has run a minute. While it waits to restart it is *down*: ``/health`` answers 503 naming it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 10.0
CALM_S = 60.0  # a loop that ran this long without failing starts again from the first pause


class Loops:
    def __init__(self, on_restart: Callable[[str], None] = lambda name: None, clock: Callable[[], float] = time.monotonic):
        self._on_restart = on_restart
        self._clock = clock
        self._tasks: list[asyncio.Task] = []
        self._down: set[str] = set()

    def keep(self, name: str, forever: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Run ``forever()`` until ``stop`` (or it returns), starting it again whenever it raises."""
        task = asyncio.create_task(self._kept(name, forever), name=name)
        self._tasks.append(task)
        return task

    def down(self) -> list[str]:
        """The loops waiting to start again after a failure."""
        return sorted(self._down)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _kept(self, name: str, forever: Callable[[], Awaitable[None]]) -> None:
        pause = FIRST_PAUSE_S
        while True:
            started = self._clock()
            try:
                await forever()
                return
            except Exception:
                pause = FIRST_PAUSE_S if self._clock() - started >= CALM_S else pause
                log.exception("background loop %r failed; it starts again in %.1f s", name, pause)
            self._on_restart(name)
            self._down.add(name)
            try:
                await asyncio.sleep(pause)
            finally:
                self._down.discard(name)
            pause = min(pause * 2, MAX_PAUSE_S)
