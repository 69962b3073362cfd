"""Real vLLM behind the Engine interface. The only module that imports vllm (lazily)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import numpy as np

from worker.config import VllmGenerator
from worker.engines.base import Engine, EngineInfo
from worker.machine import ENGINE_NICE, has_gpu, preload_tcmalloc, resolve_dtype, this_cpu_flags, yield_to_control

log = logging.getLogger(__name__)


def _cpu_defaults() -> None:
    """vLLM's CPU backend needs these to start, and to stay lean, on a small machine; an
    operator's values win."""
    # Without an explicit KV-cache size the CPU backend runs a NUMA memory check that fails
    # on containers; without reserving 0 CPUs it leaves one core idle.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    allocator = preload_tcmalloc()
    if allocator:
        log.info("the engine allocates with tcmalloc (%s), as vLLM's CPU backend asks", allocator)
    elif "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        log.warning("tcmalloc not found: the engine's memory may grow under load (Debian: apt-get install libtcmalloc-minimal4)")


class VllmEngine(Engine):
    def __init__(self, generator: VllmGenerator):
        # Weights come from model_path; never reach for a hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        on_gpu = has_gpu()
        if not on_gpu:
            _cpu_defaults()
        dtype = resolve_dtype(generator.dtype, on_gpu, this_cpu_flags())
        log.info("dtype %s: %s", dtype.dtype, dtype.why)
        if dtype.warning:
            log.warning(dtype.warning)
        from vllm import LLM

        self._llm = LLM(
            model=str(generator.model_path),
            runner="pooling",  # what task = "embed" (and "score") means since vLLM 0.10
            dtype=dtype.dtype,
            max_model_len=generator.max_model_len,
            max_num_seqs=generator.max_num_seqs,
            max_num_batched_tokens=generator.max_num_batched_tokens,
            tensor_parallel_size=generator.tensor_parallel_size,
            pipeline_parallel_size=generator.pipeline_parallel_size,
            gpu_memory_utilization=generator.gpu_memory_utilization,
            enforce_eager=generator.enforce_eager,
            trust_remote_code=generator.trust_remote_code,
            hf_overrides={"architectures": [splade_architecture(generator.model_path)]} if generator.task == "sparse" else None,
        )
        self._tokenizer: Any = cast(Any, self._llm.get_tokenizer())  # Hugging Face's: vLLM's protocol names less of it
        max_len = self._llm.llm_engine.model_config.max_model_len
        self._max_len = max_len
        warm_up: Callable[[], Any]
        normalized = True
        if generator.task == "score":
            warm_up = partial(self.score, [("embedq warm-up", "warm-up")])
            warm_up()
            dimensions = 1
        else:
            warm_up = partial(self._embed_unchecked, self.tokenize(["embedq warm-up"]))
            vector = warm_up()
            dimensions = vector.shape[1]
            # vLLM follows the model's modules.json: unit-length vectors only where it ends in Normalize.
            normalized = generator.task == "embed" and abs(float(np.linalg.norm(vector[0])) - 1.0) < 1e-3
        started = time.monotonic()
        warm_up()  # warmed up, a call of one short input is about the fixed part of any call
        call_s = time.monotonic() - started
        self.info = EngineInfo(dimensions, max_len, vocab_size=len(self._tokenizer), task=generator.task, call_s=call_s,
                               normalized=normalized)  # fmt: skip
        if not on_gpu:
            log.info("the engine's %d threads yield the CPU to the worker's own (nice %d)", yield_to_control(), ENGINE_NICE)
        # The special tokens around an input's own ids (e.g. [CLS] ... [SEP]): what a chunk is framed with.
        with_specials, bare = self.tokenize(["a"]), self.tokenize(["a"], special_tokens=False)
        head = with_specials[0].index(bare[0][0])
        self._frame = (with_specials[0][:head], with_specials[0][head + len(bare[0]) :])
        kind = {"score": "a cross-encoder", "sparse": f"SPLADE, a vocabulary of {dimensions}"}.get(
            generator.task, f"{dimensions} dims" + ("" if normalized else ", not normalised")
        )
        log.info("vLLM engine ready: %s, %s, %d tokens max, %.0f ms a call of one short input", generator.model_path, kind,
                 max_len, call_s * 1000)  # fmt: skip

    def tokenize(self, texts: list[str], truncate: bool = False, special_tokens: bool = True) -> list[list[int]]:
        cut = {"truncation": True, "max_length": self._max_len} if truncate else {}
        return self._tokenizer(texts, add_special_tokens=special_tokens, **cut)["input_ids"]

    def detokenize(self, token_ids: list[list[int]]) -> list[str]:
        return self._tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def chunks(self, token_ids: list[int], size: int) -> list[list[int]]:
        head, tail = self._frame
        inner = token_ids[len(head) : len(token_ids) - len(tail)]
        room = size - len(head) - len(tail)
        return [[*head, *inner[i : i + room], *tail] for i in range(0, len(inner), room)]

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        return self._embed_unchecked(token_ids)

    def score(self, pairs: list[tuple[str, str]], truncate: bool = False) -> tuple[np.ndarray, list[int]]:
        cut = {"truncation": True, "max_length": self._max_len} if truncate else {}
        firsts: list[Any] = [a for a, _ in pairs]
        seconds: list[Any] = [b for _, b in pairs]
        outputs = self._llm.score(firsts, seconds, use_tqdm=False, tokenization_kwargs=cut or None)
        tokens = [len(ids) for ids in self._tokenizer(firsts, seconds, **cut)["input_ids"]]
        return np.array([o.outputs.score for o in outputs], dtype=np.float32), tokens

    def _embed_unchecked(self, token_ids: list[list[int]]) -> np.ndarray:
        import torch
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        outputs = self._llm.encode(prompts, use_tqdm=False, pooling_task="embed")
        # .data is the pooled float tensor; .embedding would build a Python list of floats.
        return torch.stack([o.outputs.data for o in outputs]).to(torch.float32).numpy()

    def close(self) -> None:
        # Stops the engine-core process now rather than at interpreter exit.
        self._llm.llm_engine.engine_core.shutdown()


SPLADE = "BertSpladeSparseEmbeddingModel"  # vLLM's SPLADE: max over tokens of log(1 + relu(MLM logits))


def splade_architecture(model_path: str) -> str:
    """What vLLM loads a ``task = "sparse"`` model as: a SPLADE checkpoint is a BertForMaskedLM
    (naver's, and sentence-transformers' SparseEncoder's); a checkpoint whose config.json names
    another architecture is refused at start."""
    import json
    from pathlib import Path

    config = Path(model_path) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures", []) if config.exists() else []
    if architectures and architectures[0] not in ("BertForMaskedLM", SPLADE):
        raise ValueError(f'generator.task = "sparse" serves SPLADE models (BertForMaskedLM); {model_path} is {architectures[0]}')
    return SPLADE
