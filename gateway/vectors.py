"""What is done to a model's vectors after the engine: a Matryoshka cut (``cut_to``), and the
types vector databases store them as, asked per request (``quantize``): ``int8`` and ``uint8`` (scalar
quantization, a byte a dimension: 4x smaller) and ``binary`` and ``ubinary`` (a bit a dimension,
packed eight to a byte: 32x smaller), after any Matryoshka cut. The formulas are
sentence-transformers' ``quantize_embeddings`` (its results are the tests' reference):

- binary: bit i of a vector is 1 where its dimension i is > 0, packed big-end first
  (``numpy.packbits``); ``ubinary`` is those bytes (0..255), ``binary`` the same minus 128
  (-128..127), as Cohere packs them;
- int8 and uint8: each dimension has a range [low, high]; a value becomes
  ``clip(floor((value - low) / ((high - low) / 255)), 0, 255)`` (uint8), minus 128 for int8.

The ranges are the model's, not the request's: quantized vectors are compared with vectors of
other requests (a query today with a corpus indexed last month), so a range taken from each
request's own vectors would make them incomparable. The first time a model is asked for int8 or
uint8, the gateway embeds a fixed calibration corpus (``calibration.py``: 256 texts, as a request
that names no prompt) and takes each dimension's min and max, at the full size and at each
Matryoshka size, widened by 5% of their span each side (``RANGE_MARGIN``; ``calibration.py`` says
why). They are kept for good in the gateway's store (the data directory, or Redis with replicas;
the first writer wins), so every request, replica and restart uses the same ranges, whatever else
of the model's card changes (its prompts, its description), until its sizes or its normalisation
do.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import numpy as np
import orjson

from gateway.calibration import calibration_texts
from gateway.queue import INTERACTIVE
from gateway.registry import Route
from gateway.tenancy import calls

log = logging.getLogger(__name__)
CALIBRATED = ("int8", "uint8")
CALIBRATION_TEXTS = len(calibration_texts())
RANGE_MARGIN = 0.05  # of a dimension's range, added each side: fewer values of other texts clipped


def cut_to(vectors: np.ndarray, dimensions: int, normalized: bool) -> np.ndarray:
    """The first ``dimensions`` of each vector, re-normalised if the model's vectors are unit-length."""
    cut = vectors[:, :dimensions]
    return l2_normalize(cut) if normalized else np.ascontiguousarray(cut)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def quantize(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """``vectors`` (n, dims) float32 as ``dtype``; ``ranges`` (2, dims): low and high per
    dimension, for int8 and uint8 (``Calibrations``)."""
    if dtype == "float":
        return vectors
    if dtype in ("binary", "ubinary"):
        bits = np.packbits(vectors > 0, axis=-1)
        return (bits - 128).astype(np.int8) if dtype == "binary" else bits
    assert ranges is not None and ranges.shape == (2, vectors.shape[1]), "int8 needs the model's ranges at this size"
    low = ranges[0]
    steps = (ranges[1] - low) / 255
    steps = np.where(steps == 0, 1, steps)
    values = np.clip(np.floor((vectors - low) / steps), 0, 255)
    return values.astype(np.uint8) if dtype == "uint8" else (values - 128).astype(np.int8)


def base64_rows(vectors: np.ndarray) -> list[str]:
    """Each vector as base64 of its little-endian float32 bytes: OpenAI's base64, and Cohere's."""
    return [base64.b64encode(row.tobytes()).decode() for row in vectors.astype("<f4", copy=False)]


def packed_size(dimensions: int, dtype: str) -> int:
    """The values a vector of ``dimensions`` has as ``dtype``."""
    return (dimensions + 7) // 8 if dtype.endswith("binary") else dimensions


Embed = Callable[[Route, list[str]], Awaitable[np.ndarray]]  # (route, texts) -> full-size vectors


class Kept(Protocol):
    """Values kept once under a name, for good (the batch store's, ``batches/store.py``)."""

    async def kept(self, name: str) -> bytes | None: ...

    async def keep(self, name: str, value: bytes) -> bytes:
        """Keep ``value`` unless one is kept under ``name`` already; the one kept."""
        ...


class Calibrations:
    """Each model's int8 ranges: in this process once known, in the store (``kept``) for every
    replica and restart, computed at most once at a time per model in this process."""

    def __init__(self, embed: Embed, kept: Kept):
        self._embed = embed
        self._kept = kept
        self._known: dict[str, dict[int, np.ndarray]] = {}  # per name_of(route): size -> (2, size)
        self._running: dict[str, asyncio.Task] = {}

    async def ranges(self, route: Route, dimensions: int) -> np.ndarray:
        name = name_of(route)
        if name not in self._known:
            task = self._running.get(name)
            if task is None:
                # Its own context: the engine time is the service's, counted on no client's request;
                # interactive, as the first request waiting for it may be (it is 256 texts, once).
                context = contextvars.Context()
                context.run(calls.enter, calls.Call(priority=INTERACTIVE, source="calibration"))
                task = asyncio.get_running_loop().create_task(self._calibrate(route, name), context=context)
                self._running[name] = task
                task.add_done_callback(lambda done: self._ended(name, done))
            self._known[name] = await asyncio.shield(task)
        return self._known[name][dimensions]

    def _ended(self, name: str, task: asyncio.Task) -> None:
        self._running.pop(name, None)
        if not task.cancelled():
            task.exception()  # retrieved: each request that waited got it; one that left needs no log of it

    async def _calibrate(self, route: Route, name: str) -> dict[int, np.ndarray]:
        kept = await self._kept.kept(name)
        if kept is None:
            log.info("calibrating the int8 ranges of model %r on %d texts", route.model, CALIBRATION_TEXTS)
            vectors = await self._embed(route, calibration_texts())
            kept = await self._kept.keep(name, orjson.dumps(ranges_at_sizes(route, vectors), option=orjson.OPT_SERIALIZE_NUMPY
                                                       | orjson.OPT_NON_STR_KEYS))  # fmt: skip
        return {int(size): np.array(pair, dtype=np.float32) for size, pair in orjson.loads(kept).items()}


def ranges_at_sizes(route: Route, vectors: np.ndarray) -> dict[int, np.ndarray]:
    card = route.card
    sizes = [card.dimensions, *(d for d in card.matryoshka_dimensions if d < card.dimensions)]
    at = {size: cut_to(vectors, size, card.normalized) if size < card.dimensions else vectors for size in sizes}
    return {size: widened(v.min(axis=0), v.max(axis=0)) for size, v in at.items()}


def widened(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The calibration's min and max, ``RANGE_MARGIN`` of their span wider each side: (2, dims)."""
    margin = (high - low) * np.float32(RANGE_MARGIN)
    return np.vstack((low - margin, high + margin)).astype(np.float32)


def name_of(route: Route) -> str:
    """What a model's ranges are kept under: its name and what of its card shapes them (a model
    whose sizes or normalisation change is calibrated again)."""
    card = route.card
    shape = orjson.dumps([card.dimensions, sorted(card.matryoshka_dimensions), card.normalized])
    return f"int8-ranges/{route.model}/{hashlib.sha256(shape).hexdigest()[:16]}"
