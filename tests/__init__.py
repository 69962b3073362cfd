"""embedq's tests, in two tiers: ``fast`` (in process: the gateway app through
``httpx.ASGITransport``, the queue core, the batcher and the runner on the fake engine; seconds)
and ``system`` (real processes on loopback ports, real vLLM, Redis, Chromium)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
