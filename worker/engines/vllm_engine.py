"""Real vLLM behind the Engine interface. The only module that imports vllm (lazily)."""

from __future__ import annotations

import logging
import os

import numpy as np

from worker.config import VllmGenerator
from worker.engines.base import Engine, EngineInfo
from worker.machine import has_gpu, preload_tcmalloc, resolve_dtype, this_cpu_flags

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
            runner="pooling",  # what task = "embed" means since vLLM 0.10
            dtype=dtype.dtype,
            max_model_len=generator.max_model_len,
            max_num_seqs=generator.max_num_seqs,
            max_num_batched_tokens=generator.max_num_batched_tokens,
            tensor_parallel_size=generator.tensor_parallel_size,
            pipeline_parallel_size=generator.pipeline_parallel_size,
            gpu_memory_utilization=generator.gpu_memory_utilization,
            enforce_eager=generator.enforce_eager,
            trust_remote_code=generator.trust_remote_code,
        )
        self._tokenizer = self._llm.get_tokenizer()
        max_len = self._llm.llm_engine.model_config.max_model_len
        probe = self._embed_unchecked(self.tokenize(["embedq warm-up"]))
        self.info = EngineInfo(dimensions=probe.shape[1], max_input_tokens=max_len, vocab_size=len(self._tokenizer))
        log.info("vLLM engine ready: %s, %d dims, %d tokens max", generator.model_path, *probe.shape[1:], max_len)

    def tokenize(self, texts: list[str], truncate: bool = False) -> list[list[int]]:
        if truncate:
            return self._tokenizer(texts, truncation=True, max_length=self.info.max_input_tokens)["input_ids"]
        return self._tokenizer(texts)["input_ids"]

    def embed(self, token_ids: list[list[int]]) -> np.ndarray:
        return self._embed_unchecked(token_ids)

    def _embed_unchecked(self, token_ids: list[list[int]]) -> np.ndarray:
        import torch
        from vllm.inputs import TokensPrompt

        outputs = self._llm.encode(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], use_tqdm=False, pooling_task="embed"
        )
        # .data is the pooled float tensor; .embedding would build a Python list of floats.
        return torch.stack([o.outputs.data for o in outputs]).to(torch.float32).numpy()

    def close(self) -> None:
        # Stops the engine-core process now rather than at interpreter exit.
        self._llm.llm_engine.engine_core.shutdown()
