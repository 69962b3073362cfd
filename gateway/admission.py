"""Admission by time, not by count: a request that would wait in its model's queue longer than it
can is refused at once (429 with an honest Retry-After), not admitted to time out.

``QueueLoad`` is one model queue as this process sees it: the estimated tokens of its admitted,
unanswered requests per priority class and tenant, and how fast they drain: the tokens answered
per second over the last ``RATE_WINDOW_S``, counted only while requests were waiting (an idle
queue says nothing about speed). With no measure yet (a queue that filled less than
``MIN_MEASURE_S`` ago, or fewer than ``MIN_ANSWERED`` requests answered since), a rate from a
handful of answers is noise (a worker that hung a moment looks like a dead queue): it takes the
speed the workers' engines report instead (``JobQueue.speed``: their measured pace, at full
calls), or, where none has, admits. Without that prior, a wave that filled the queue at once (32
clients each sending 16 long texts) was all admitted, to time out a minute later.

A request is refused (429) for the time others' work ahead of it takes, over ``queue_wait_s``,
not for its own: a request that finds nothing waiting is admitted whatever its size, as the token
bound lets one in alone. (Counted with its own, 21,845 short inputs, legal and ~7 s of work, got a
429 whenever a light client's request happened to be in line, and again on retry. Its own work is
not judged against the timeout either: the rate measured under light traffic is the traffic's, not
the engines', and the engines' reported pace is noisy while they are new; a wrong 413 would be
final, where a request that outlasts the timeout gets its 504.)

A new request's wait is predicted as the queue would serve it (``queue/store.py``): everything
of the higher classes first; in its own class, each other tenant's waiting tokens up to what that
tenant gets while this one's are served (weighted fair shares); then its tenant's own, its own
included. So shedding falls first on a tenant over its share: a flooding key's requests see its
own long line and are refused, while a light key's see a short one.

With replicas, each measures its own requests: they share the queue's line and its speed alike.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gateway.queue import Placement

RATE_WINDOW_S = 10.0
MIN_MEASURE_S = 2.0  # a rate over a shorter backlog is no measure
MIN_ANSWERED = 16  # nor one over fewer answers


@dataclass
class QueueLoad:
    requests: int = 0
    tokens: int = 0
    waiting: dict[tuple[int, str], int] = field(default_factory=dict)  # (class, tenant) -> estimated tokens
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> weight, while it has tokens waiting
    # (when, estimated tokens) answered in this backlog and the last RATE_WINDOW_S, and their sum:
    # a running sum, as this is read on every request.
    _answered: deque[tuple[float, int]] = field(default_factory=deque)
    _answered_tokens: int = 0
    _backlogged_since: float | None = None
    _class_requests: dict[int, int] = field(default_factory=dict)  # class -> requests waiting

    def at_or_above(self, priority: int) -> tuple[int, int]:
        """Requests and estimated tokens waiting of this class or a more urgent one: what a request
        of the class is admitted against, so that bulk work never takes an urgent request's room
        (the queue then holds at most twice its bounds, half of it bulk)."""
        requests = sum(n for cls, n in self._class_requests.items() if cls <= priority)
        return requests, sum(n for (cls, _), n in self.waiting.items() if cls <= priority)

    def enter(self, placement: Placement, tokens: int, now: float) -> None:
        if self.requests == 0:  # a new backlog: answers from before it say nothing of its speed
            self._backlogged_since = now
            self._answered.clear()
            self._answered_tokens = 0
        self.requests += 1
        self.tokens += tokens
        self._class_requests[placement.priority] = self._class_requests.get(placement.priority, 0) + 1
        where = (placement.priority, placement.tenant)
        self.waiting[where] = self.waiting.get(where, 0) + tokens
        self.weights[placement.tenant] = placement.weight

    def leave(self, placement: Placement, tokens: int, now: float, answered: bool) -> None:
        self.requests -= 1
        self.tokens -= tokens
        self._class_requests[placement.priority] -= 1
        where = (placement.priority, placement.tenant)
        self.waiting[where] -= tokens
        if not self.waiting[where]:
            del self.waiting[where]
            if not any(tenant == placement.tenant for _, tenant in self.waiting):
                self.weights.pop(placement.tenant, None)
        if answered:
            self._answered.append((now, tokens))
            self._answered_tokens += tokens
        if self.requests == 0:
            self._backlogged_since = None

    def rate(self, now: float) -> float | None:
        """Estimated tokens answered per second while backlogged; None if not measured."""
        while self._answered and self._answered[0][0] < now - RATE_WINDOW_S:
            self._answered_tokens -= self._answered.popleft()[1]
        if self._backlogged_since is None:
            return None
        since = max(now - RATE_WINDOW_S, self._backlogged_since)
        drained = self._answered_tokens  # every answer kept is since then
        if now - since < MIN_MEASURE_S or len(self._answered) < MIN_ANSWERED or not drained:
            return None
        return drained / (now - since)

    def predicted_s(
        self, placement: Placement, tokens: int, now: float, prior: float | None = None
    ) -> tuple[float, float] | None:
        """A new request's seconds in line for others' work (and its tenant's earlier requests')
        and for its own, at the queue's rate; ``prior``: the tokens per second to assume while that
        is unmeasured."""
        rate = self.rate(now) or prior
        if not rate:
            return None
        mine = self.waiting.get((placement.priority, placement.tenant), 0) + tokens
        ahead: float = sum(n for (cls, _), n in self.waiting.items() if cls < placement.priority)
        for (cls, tenant), n in self.waiting.items():
            if cls == placement.priority and tenant != placement.tenant:
                ahead += min(n, mine * self.weights.get(tenant, 1.0) / placement.weight)
        return (ahead + mine - tokens) / rate, tokens / rate
