"""The deterministic fake engine, for fast tests and gateway load tests: same input, same vector,
on every worker; with faults to inject (a poisoned input, a dying engine, a hanging one, wrong
answers). With ``task = "score"`` it is a fake cross-encoder: a pair's score is the cosine of its
texts' fake vectors; with ``task = "sparse"`` a fake SPLADE (``sparse_weights``)."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np

from worker.config import FakeGenerator
from worker.engines.base import Engine, EngineInfo


class FakeEngine(Engine):
    """Deterministic vectors from token ids: same input, same vector, on every worker.

    Tokens are whitespace-separated words hashed into a BERT-sized vocabulary, framed by the
    ids BERT uses for [CLS] and [SEP], so token-id and text inputs behave as with a real model.
    """

    CLS, SEP = 101, 102

    def __init__(self, generator: FakeGenerator):
        sparse = generator.task == "sparse"  # a weight per vocabulary token, as SPLADE's
        self.info = EngineInfo(
            30522 if sparse else generator.dimensions, generator.max_model_len, vocab_size=30522, task=generator.task,
            call_s=generator.call_s + generator.delay_s, normalized=generator.normalize and not sparse,
        )  # fmt: skip
        self._call_s, self._token_s, self._delay_s = generator.call_s, generator.token_s, generator.delay_s
        self._dead_after = generator.dead_after_batches
        self._hang_after = generator.hang_after_batches
        self._wrong_kind = generator.wrong
        self._closed = threading.Event()  # a hung call ends when the engine is closed
        self._vocab_poison = self.tokenize([generator.poison])[0][1:-1] if generator.poison else None
        self.started = 0  # how many engine calls were begun
        self.batches = 0  # how many engine calls were made
        self.calls: list[list[int]] = []  # the tokens of each input of each call, for tests to read

    def tokenize(self, texts: list[str], truncate: bool = False, special_tokens: bool = True) -> list[list[int]]:
        vocab = self.info.vocab_size - 1000
        room = self.info.max_input_tokens - 2 if truncate else None
        words = [[1000 + zlib.crc32(w.encode()) % vocab for w in text.split()][:room] for text in texts]
        return [[self.CLS, *ids, self.SEP] if special_tokens else ids for ids in words]

    def detokenize(self, token_ids: list[list[int]]) -> list[str]:
        """Its tokens are hashes: the "text" names them (enough to test the round trip's shape)."""
        return [" ".join(f"t{i}" for i in ids if i not in (self.CLS, self.SEP)) for ids in token_ids]

    def chunks(self, token_ids: list[int], size: int) -> list[list[int]]:
        inner = token_ids[1:-1]
        return [[self.CLS, *inner[i : i + size - 2], self.SEP] for i in range(0, len(inner), size - 2)]

    def score(self, pairs: list[tuple[str, str]], truncate: bool = False) -> tuple[np.ndarray, list[int]]:
        firsts = self.embed(self.tokenize([a for a, _ in pairs], truncate))
        seconds = self.embed(self.tokenize([b for _, b in pairs], truncate))
        tokens = [len(a) + len(b) - 1 for a, b in zip(self.tokenize([a for a, _ in pairs]), self.tokenize([b for _, b in pairs]))]
        cosines = np.einsum("ij,ij->i", firsts, seconds) / np.linalg.norm(firsts, axis=1) / np.linalg.norm(seconds, axis=1)
        return cosines.astype(np.float32), tokens

    def cost_s(self, token_ids: list[list[int]]) -> float:
        """What a call over these inputs takes: its fixed part, its tokens', and the fixed pace."""
        return self._call_s + self._token_s * sum(map(len, token_ids)) + self._delay_s

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        self.started += 1
        if cost := self.cost_s(token_ids):
            time.sleep(cost)
        self.batches += 1
        self.calls.append([len(ids) for ids in token_ids])
        if self._hang_after and self.batches > self._hang_after:
            self._closed.wait()  # hangs, as an engine stuck in a kernel would, while the process lives
            raise RuntimeError("fake engine was closed while hung")
        if self._dead_after and self.batches > self._dead_after:
            raise RuntimeError("fake engine is dead")
        if self._vocab_poison and any(_contains(ids, self._vocab_poison) for ids in token_ids):
            raise RuntimeError("fake engine choked on a poisoned input")
        if self.info.task == "sparse":
            return self._wrong(sparse_weights(token_ids, self.info.vocab_size))
        # One hash per input, then splitmix64 over (input, dimension) counters, all rows at once.
        seeds = np.array([zlib.crc32(np.asarray(ids, dtype="<i8").tobytes()) for ids in token_ids], dtype=np.uint64)
        x = (seeds[:, None] << np.uint64(32)) + np.arange(self.info.dimensions, dtype=np.uint64)
        x *= np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        out = (x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 23) - np.float32(1.0)  # uniform in [-1, 1)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        if not self.info.normalized:  # a length of its own per input, as a raw pooled vector has
            out *= (2 + seeds % np.uint64(7)).astype(np.float32)[:, None]
        return self._wrong(out)

    def _wrong(self, out: np.ndarray) -> np.ndarray:
        if self._wrong_kind == "nan":
            out[:, 0] = np.nan
        elif self._wrong_kind == "dims":
            out = out[:, : max(1, out.shape[1] // 2)]
        elif self._wrong_kind == "rows" and len(out) > 1:
            out = out[:-1]
        return out

    def close(self) -> None:
        self._closed.set()


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def sparse_weights(token_ids: list[list[int]], vocab_size: int) -> np.ndarray:
    """A fake SPLADE's vectors: each token of an input weighs 0.5 to 1.5 (by its id), the rest 0."""
    out = np.zeros((len(token_ids), vocab_size), dtype=np.float32)
    for row, ids in zip(out, token_ids):
        unique = np.unique(np.asarray(ids, dtype=np.int64))
        row[unique] = 0.5 + (unique * 2654435761 % 1000) / 1000
    return out
