"""What a model's own files say, read apart from the engine (``--check`` reads them without one):
the prompts of its sentence-transformers config, and the longest input vLLM will let it take.

Prompts: ``config_sentence_transformers.json`` names them (``"prompts": {"query": "query: "}``)
and may name a default (``default_prompt_name``), as sentence-transformers reads them; a
``[queue.models]`` entry's own ``prompts`` override them name by name, and its
``default_prompt`` the default ("" for none).

The longest input: vLLM refuses at start-up a ``max_model_len`` over the one it derives from the
model (``vllm/config/model.py``, ``_get_and_verify_max_len``): the smallest of the lengths
``config.json`` names, ``model_max_length`` there overriding; for an absolute-position pooling
model, ``tokenizer_config.json``'s ``model_max_length`` if smaller; times a RoPE scaling factor;
and the ``max_seq_length`` of its sentence-transformers config over all of them. Read here the
same way, so that a config over it fails its check, naming the key, rather than the engine's
start minutes later.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import VllmGenerator, WorkerConfig

ST_CONFIG = "config_sentence_transformers.json"
# The files vLLM reads a sentence-transformers max_seq_length from, the first found.
ST_LENGTH_FILES = (
    "sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
    "sentence_camembert_config.json", "sentence_albert_config.json", "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)  # fmt: skip
LENGTH_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip
# RoPE types whose max_position_embeddings is already scaled (vLLM does not apply their factor).
SCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


class ModelFileError(Exception):
    """A model file that exists and cannot be read as what it must be."""


@dataclass(frozen=True)
class ModelPrompts:
    prompts: dict[str, str]
    default: str  # "": none


@dataclass(frozen=True)
class LengthLimit:
    tokens: int
    source: str  # where it comes from, e.g. "max_seq_length in sentence_bert_config.json"


def _read(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    return data


def model_prompts(model_path: str | Path) -> ModelPrompts:
    """The prompts the model's sentence-transformers config names (none if it has no such file)."""
    data = _read(Path(model_path), ST_CONFIG) or {}
    prompts = data.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ModelFileError(f"{Path(model_path) / ST_CONFIG}: 'prompts' must map names to strings")
    default = data.get("default_prompt_name") or ""
    if default and default not in prompts:
        raise ModelFileError(f"{Path(model_path) / ST_CONFIG}: default_prompt_name {default!r} is not one of its prompts")
    return ModelPrompts(dict(prompts), default)


def length_limit(model_path: str | Path) -> LengthLimit | None:
    """The longest input vLLM lets this model take (None: the files name none, or are not there)."""
    folder = Path(model_path)
    config = _read(folder, "config.json")
    if config is None:
        return None
    text: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    limit, source = math.inf, ""
    for key in LENGTH_KEYS:
        value = text.get(key)
        if isinstance(value, int | float) and value < limit:
            limit, source = value, f"{key} in config.json"
    if isinstance(text.get("model_max_length"), int | float):
        limit, source = text["model_max_length"], "model_max_length in config.json"
    if text.get("position_embedding_type") == "absolute":
        tokenizer = _read(folder, "tokenizer_config.json") or {}
        value = tokenizer.get("model_max_length")
        if isinstance(value, int | float) and value < limit:
            limit, source = value, "model_max_length in tokenizer_config.json"
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    if isinstance(rope, dict) and "gemma3" not in str(text.get("model_type", "")) and limit != math.inf:
        kind = rope.get("rope_type", rope.get("type", "default"))
        factor = rope.get("factor")
        if kind not in SCALED_ROPE and isinstance(factor, int | float) and factor != 1:
            limit, source = limit * factor, f"{source}, times its RoPE factor {factor:g}"
    for name in ST_LENGTH_FILES:
        st = _read(folder, name)
        if st:
            if isinstance(st.get("max_seq_length"), int):
                limit, source = st["max_seq_length"], f"max_seq_length in {name}"
            break
    return None if limit == math.inf else LengthLimit(int(limit), source)


def length_problem(model_path: str | Path, max_model_len: int | None) -> str | None:
    """Why vLLM would refuse this ``max_model_len`` for the model, or None."""
    if max_model_len is None or os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true"):
        return None
    limit = length_limit(model_path)
    if limit is None or max_model_len <= limit.tokens:
        return None
    config = _read(Path(model_path), "config.json") or {}
    override = config.get("model_max_length")
    if isinstance(override, int | float) and max_model_len <= override:
        return None  # vLLM lets config.json's model_max_length raise the limit
    return (f"generator.max_model_len: {max_model_len} is over the {limit.tokens} tokens this model takes "
            f"({limit.source}); vLLM would refuse to start")  # fmt: skip


def served_prompts(generator_model_path: str | None, entry_prompts: dict[str, str], entry_default: str | None) -> ModelPrompts:
    """A [queue.models] entry's prompts: the model's own, the entry's over them name by name; its
    default prompt: the entry's if it says one ("": none), else the model's."""
    own = model_prompts(generator_model_path) if generator_model_path else ModelPrompts({}, "")
    prompts = {**own.prompts, **entry_prompts}
    default = own.default if entry_default is None else entry_default
    if default and default not in prompts:
        raise ModelFileError(
            f"default_prompt: {default!r} is not one of the model's prompts ({', '.join(sorted(prompts)) or 'none'})"
        )
    return ModelPrompts(prompts, default)


def model_problems(config: WorkerConfig) -> list[str]:
    """What in the config the model's own files make unusable; each names its key. Nothing for a
    model folder not on this machine (the file is often checked away from its node)."""
    generator = config.generator
    if not isinstance(generator, VllmGenerator) or not Path(generator.model_path).is_dir():
        return []
    problems = []
    try:
        if problem := length_problem(generator.model_path, generator.max_model_len):
            problems.append(problem)
        for name, model in config.queue.models.items():
            try:
                served_prompts(generator.model_path, model.prompts, model.default_prompt)
            except ModelFileError as exc:
                if str(exc).startswith("default_prompt"):
                    raise ModelFileError(f'queue.models."{name}".{exc}') from None
                raise
    except ModelFileError as exc:
        problems.append(str(exc))
    return problems
