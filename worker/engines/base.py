"""The engine interface. The worker talks to an engine in token ids: it tokenizes once, checks
each input's length itself (so one over-long input fails its own job rather than the whole
batch), and hands the ids over. An engine either embeds (an embedding model) or scores pairs of
texts (a cross-encoder); every engine tokenizes and detokenizes with its model's tokenizer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    dimensions: int  # of its vectors; a cross-encoder's score is one number
    max_input_tokens: int
    vocab_size: int
    task: Literal["embed", "score", "sparse"] = "embed"
    call_s: float = 0.0  # the fixed part of an engine call: a call of one short input, timed at load (0: not known)
    # Whether its vectors are unit-length: a model whose sentence-transformers modules end in
    # Normalize (most do), as vLLM follows them. Without one, its vectors are the pooled ones as
    # they come, as sentence-transformers' encode gives them.
    normalized: bool = True


class Engine(ABC):
    info: EngineInfo

    @abstractmethod
    def tokenize(self, texts: list[str], truncate: bool = False, special_tokens: bool = True) -> list[list[int]]:
        """Token ids for each text, special tokens included (unless told not to); cut to
        max_input_tokens (special tokens kept) only if truncate."""

    @abstractmethod
    def detokenize(self, token_ids: list[list[int]]) -> list[str]:
        """The text of each list of token ids, special tokens left out."""

    @abstractmethod
    def chunks(self, token_ids: list[int], size: int) -> list[list[int]]:
        """An over-long input's ids as inputs of at most ``size`` tokens, each with the special
        tokens an input has (a chunk is embedded as an input would be)."""

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        """A (len(token_ids), dimensions) float32 matrix: L2-normalised rows if ``info.normalized``."""
        raise NotImplementedError("this engine scores pairs; it does not embed")

    def score(self, pairs: list[tuple[str, str]], truncate: bool = False) -> tuple[np.ndarray, list[int]]:
        """A float32 score per pair, and the tokens of each pair as the model reads it."""
        raise NotImplementedError("this engine embeds; it does not score pairs")

    def close(self) -> None:  # noqa: B027 - engines without resources need not override it
        """Release the engine's processes and memory."""
