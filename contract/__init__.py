"""The gateway <-> worker contract: what both sides import, and nothing else.

``messages`` holds the strict JSON models of every call, ``frames`` the raw float32 codec that
carries vectors (on the wire, and inside the gateway's Redis queue). Neither side's package is
imported from here, so the gateway never reaches into the worker's package, nor the worker into
the gateway's. The calls, all ``POST`` under ``/internal/v1`` and all with a worker token:

    /workers/heartbeat   WorkerHello     -> HeartbeatReply   registers, and keeps the worker alive
    /workers/leave       WorkerBye       -> {}               draining (no more jobs), then gone
    /lease               LeaseRequest    -> LeaseReply       long-poll
    /results             results frame   -> PostReply        vectors as raw little-endian float32
    /errors              ErrorReport     -> PostReply        typed failures, per job
    /release             Release         -> PostReply        give jobs back (stopping, dead engine)
    /leases/check        Release         -> LiveJobs         are these prefetched jobs still wanted?

A worker is who it registered as only with its session secret (``SESSION_HEADER`` on every
call). A lease belongs to the worker that took it: answers and give-backs count only from that
worker and under the job's current lease id, and only answers that fit the job reach a client. A
lease lasts what the worker asks for (``hold_s``: it knows its engine's pace), bounded by the
gateway, and ends early when the worker is gone (its final goodbye, or no heartbeat for the
gateway's worker TTL); a stale answer is ignored, so a slow worker can never answer twice.
"""

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    """The installed embedq's version, which both sides report (the worker in its hello)."""
    try:
        return version("embedq")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
