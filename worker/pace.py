"""How fast this worker's engine is, measured; what its leases ask the gateway for.

``fill_s``: how long the engine stays busy with the batch it computes now; until then a lease
waits for a full batch (the engine could not start it sooner anyway).

``hold_s``: how long the worker may need for jobs it leases now: the rest of the current batch
and then a batch of its own, each at most a full lease's worth of tokens, predicted from recent
engine calls, times a slack, plus a margin for the post. The gateway expires the lease after
that (bounded by its ``lease_ttl_s``), so a worker whose engine hangs loses its jobs to another
worker after a few batch times, not after a fixed minute. Until the first engine call is
measured there is no prediction, and the gateway's bound applies.

The prediction is affine in tokens (a fixed cost per call plus a cost per token), fitted
pessimistically: the fixed part is the quickest recent call, the per-token part the steepest
recent one. An engine whose cost is all per-call (the fake) and one whose cost is all
per-token (vLLM on a CPU) are both predicted well.
"""

from __future__ import annotations

import time
from collections import deque

HOLD_SLACK = 3.0  # a batch may take this many times its prediction before its lease expires
HOLD_MARGIN_S = 3.0  # time to post, and for a slow spell of the machine
MAX_FILL_S = 1.0
RECENT = 32  # engine calls the prediction looks at
SMALL_BATCH = 16  # a batch below 1/16 of a full lease's tokens weighs like one of 1/16


class EnginePace:
    def __init__(self, max_lease_tokens: int):
        self._max_tokens = max_lease_tokens
        self._recent: deque[tuple[int, float]] = deque(maxlen=RECENT)  # (tokens, seconds) per engine call
        self._average_s = 0.0
        self._since: float | None = None  # when the current engine call started

    def started(self) -> None:
        self._since = time.monotonic()

    def finished(self, tokens: int) -> float:
        """Record the engine call that started last; its duration."""
        took = time.monotonic() - (self._since if self._since is not None else time.monotonic())
        self._since = None
        self._average_s = took if not self._average_s else 0.7 * self._average_s + 0.3 * took
        if tokens:
            self._recent.append((tokens, took))
        return took

    def fill_s(self) -> float:
        """About how long until the engine is free (capped: a full batch is not worth more)."""
        if self._since is None:
            return 0.0  # idle: the next job should start at once
        return max(0.0, min(self._average_s - (time.monotonic() - self._since), MAX_FILL_S))

    def hold_s(self) -> float | None:
        if not self._recent:
            return None
        full = self.predicted_s(self._max_tokens)
        current = max(0.0, full - (time.monotonic() - self._since)) if self._since is not None else 0.0
        return HOLD_SLACK * (current + full) + HOLD_MARGIN_S

    def predicted_s(self, tokens: int) -> float:
        """A pessimistic prediction of one engine call over ``tokens`` tokens."""
        fixed = min(seconds for _, seconds in self._recent)
        floor = max(1, self._max_tokens // SMALL_BATCH)
        per_token = max((seconds - fixed) / max(count, floor) for count, seconds in self._recent)
        return fixed + per_token * tokens
