"""The engine interface. The worker talks to an engine in token ids: it tokenizes once, checks
each input's length itself (so one over-long input fails its own job rather than the whole
batch), and hands the ids over."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    dimensions: int
    max_input_tokens: int
    vocab_size: int


class Engine(ABC):
    info: EngineInfo

    @abstractmethod
    def tokenize(self, texts: list[str], truncate: bool = False) -> list[list[int]]:
        """Token ids for each text, special tokens included; cut to max_input_tokens (special
        tokens kept) only if truncate."""

    @abstractmethod
    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """A (len(token_ids), dimensions) float32 matrix of L2-normalised rows."""

    def close(self) -> None:  # noqa: B027 - engines without resources need not override it
        """Release the engine's processes and memory."""
