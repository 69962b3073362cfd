"""How fast this worker's engine is, measured; what its leases ask the gateway for.

An engine call costs a fixed part plus a part per token (vLLM's does: 1 input 9 ms, 64 inputs
146 ms on a 2-core CPU). ``fit`` is that line, least squares over the recent calls, in the
gateway's estimated tokens (each job carries its estimate), so that the gateway can size a call
to a latency objective in the units it queues by (``LeaseRequest.call_s``/``token_s``).

Calls all of one size cannot tell the two parts apart: then the fixed part is the one last
measured (by a line, or by the engine at load, with a call of one short input: ``call_s``), and
the rest is per token. Taken as all per token, a slow engine's calls (0.5 s of fixed part) were bounded to
their own size: the gateway sized the next call by them, one job a call, a quarter of what the
engine could do, and the calls never varied to show otherwise.

``fill_s``: how long the engine stays busy with the call it computes now (its predicted length,
less what has passed); until then a lease waits, and takes its jobs just before the engine is
free (the engine could not start them sooner, and a job that arrives meanwhile gets in). Where
the recent calls cannot predict this one (all of one size, or of another size), the guess is the
quickest recent call: a lease that waits too long leaves the engine idle.

``hold_s``: how long the worker may need for jobs it leases now: the rest of the current call
and then a call of its own, each at most a full lease's worth of tokens, predicted
pessimistically (the fixed part the quickest recent call, the per-token part the steepest), times
a slack, plus a margin for the post. The gateway expires the lease after that (bounded by its
``lease_ttl_s``), so a worker whose engine hangs loses its jobs to another worker after a few
call times, not after a fixed minute. Until the first call is measured there is no prediction,
and the gateway's bound applies.
"""

from __future__ import annotations

import time
from collections import deque

HOLD_SLACK = 3.0  # a call may take this many times its prediction before its lease expires
HOLD_MARGIN_S = 3.0  # time to post, and for a slow spell of the machine
MAX_FILL_S = 1.0
RECENT = 32  # engine calls the predictions look at
SMALL_BATCH = 16  # a call below 1/16 of a full lease's tokens weighs like one of 1/16 (hold_s)


class EnginePace:
    def __init__(self, max_lease_tokens: int, call_s: float = 0.0):
        self._max_tokens = max_lease_tokens
        self._recent: deque[tuple[int, float]] = deque(maxlen=RECENT)  # (tokens, seconds) per engine call
        self._since: float | None = None  # when the current engine call started
        self._expected_s = 0.0  # how long it should take
        self._fixed_s = call_s  # the fixed part of a call, last measured

    def started(self, tokens: int) -> None:
        self._since = time.monotonic()
        self._expected_s = self._expected(tokens)

    def _expected(self, tokens: int) -> float:
        """The call's length, for ``fill_s``: the fit where the recent calls tell both parts apart
        and were of about this size; else the quickest recent call. Too long a guess would keep a
        lease waiting while the engine idles; too short a one only takes the next jobs early."""
        if not self._recent:
            return 0.0
        sizes = [t for t, _ in self._recent]
        fit = self._line()
        if fit is None or not min(sizes) / 2 <= tokens <= 2 * max(sizes):
            return min(s for _, s in self._recent)
        return fit[0] + fit[1] * tokens

    def finished(self, tokens: int) -> float:
        """Record the engine call that started last (over ``tokens``); its duration."""
        took = time.monotonic() - (self._since if self._since is not None else time.monotonic())
        self._since = None
        if tokens:
            self._recent.append((tokens, took))
        return took

    def fill_s(self) -> float:
        """About how long until the engine is free (capped: a full call is not worth more)."""
        if self._since is None:
            return 0.0  # idle: the next job should start at once
        return max(0.0, min(self._expected_s - (time.monotonic() - self._since), MAX_FILL_S))

    def fit(self) -> tuple[float, float] | None:
        """(seconds per call, seconds per token), least squares over the recent calls; None
        until a call is measured. Where the calls cannot tell the parts apart, the fixed part
        last measured (at most the quickest recent call) and the rest per token."""
        if not self._recent:
            return None
        line = self._line()
        if line is None:
            mean_t = sum(t for t, _ in self._recent) / len(self._recent)
            mean_s = sum(s for _, s in self._recent) / len(self._recent)
            fixed = min(self._fixed_s, min(s for _, s in self._recent))
            return fixed, max(0.0, mean_s - fixed) / mean_t
        return line

    def _line(self) -> tuple[float, float] | None:
        """Least squares over the recent calls; None where their sizes are too alike to tell the
        fixed part from the per-token part, or the line makes no sense (a part below zero). A
        line found is the fixed part last measured, for when the calls no longer tell it."""
        count = len(self._recent)
        mean_t = sum(t for t, _ in self._recent) / count
        mean_s = sum(s for _, s in self._recent) / count
        var = sum((t - mean_t) ** 2 for t, _ in self._recent)
        if var <= 0.01 * mean_t**2 * count:
            return None
        slope = sum((t - mean_t) * (s - mean_s) for t, s in self._recent) / var
        fixed = mean_s - slope * mean_t
        if slope <= 0 or fixed < 0:
            return None
        self._fixed_s = fixed
        return fixed, slope

    def hold_s(self) -> float | None:
        if not self._recent:
            return None
        full = self.pessimistic_s(self._max_tokens)
        current = max(0.0, full - (time.monotonic() - self._since)) if self._since is not None else 0.0
        return HOLD_SLACK * (current + full) + HOLD_MARGIN_S

    def pessimistic_s(self, tokens: int) -> float:
        """A pessimistic prediction of one engine call over ``tokens`` tokens."""
        fixed = min(seconds for _, seconds in self._recent)
        floor = max(1, self._max_tokens // SMALL_BATCH)
        per_token = max((seconds - fixed) / max(count, floor) for count, seconds in self._recent)
        return fixed + per_token * tokens
