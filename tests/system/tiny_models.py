"""Tiny sentence-transformers models with seeded weights, of the families users deploy, built in
a few seconds with no download: the packaged all-MiniLM-L6-v2's tokenizer (a WordPiece of 30,522
tokens) and a few thousand random weights of each architecture.

- ``bert``: BERT, mean pooling, no Normalize module (raw vectors), and prompts in its
  ``config_sentence_transformers.json``, a default one included; 128 positions.
- ``qwen3``: Qwen3 as Qwen3-Embedding is (a causal LM checkpoint, last-token pooling, Normalize),
  with its query prompt.
- ``gemma3``: Gemma3 as EmbeddingGemma is (bidirectional attention, mean pooling, two Dense
  layers without bias, Normalize), with its prompts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HIDDEN = 64  # two heads of 32: the smallest head vLLM's CPU attention takes
FAMILIES = ("bert", "qwen3", "gemma3")


def _backbone(family: str):
    import transformers as tf

    common = {"vocab_size": 30522, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}  # fmt: skip
    if family == "bert":
        return tf.BertModel(tf.BertConfig(**common, max_position_embeddings=128))
    if family == "qwen3":
        config = tf.Qwen3Config(**common, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                                tie_word_embeddings=True)  # fmt: skip
        return tf.Qwen3ForCausalLM(config)
    if family == "gemma3":
        config = tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                                     sliding_window=64, use_bidirectional_attention=True)  # fmt: skip
        config.architectures = ["Gemma3TextModel"]
        return tf.Gemma3TextModel(config)
    raise ValueError(family)


def build(family: str, folder: Path, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """The model of ``family`` saved in ``folder`` as sentence-transformers saves it."""
    torch.manual_seed(seed)
    hf = folder / "hf"
    backbone = _backbone(family)
    backbone.save_pretrained(hf)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).exists():
            shutil.copy(Path(tokenizer_from) / name, hf / name)
    transformer = Transformer(str(hf), max_seq_length=128 if family == "bert" else 256)
    if family == "bert":
        modules = [transformer, Pooling(HIDDEN, "mean")]
        prompts = {"query": "query: ", "document": "passage: ", "search_query": "search query: "}
        default = "document"
    elif family == "qwen3":
        modules = [transformer, Pooling(HIDDEN, "lasttoken"), Normalize()]
        prompts = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:", "document": ""}
        default = None
    else:
        identity = torch.nn.Identity()
        up, down = (
            Dense(HIDDEN, 4 * HIDDEN, bias=False, activation_function=identity),
            Dense(4 * HIDDEN, HIDDEN, bias=False, activation_function=identity),
        )
        modules = [transformer, Pooling(HIDDEN, "mean"), up, down, Normalize()]
        prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
        default = None
    model = SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=default, device="cpu")
    out = folder / family
    model.save(str(out))
    shutil.rmtree(hf)
    return out


def build_splade(folder: Path, tokenizer_from: str | Path, seed: int = 0) -> Path:
    """A SPLADE model as naver's are saved: a BertForMaskedLM checkpoint (its own decoder, untied,
    as vLLM loads it) and the tokenizer; its decoder's bias is lowered so that few of the
    vocabulary's 30,522 weights of a text are above zero, as a trained SPLADE's."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
    model = tf.BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.decoder.bias.fill_(-0.45)
    out = folder / "splade"
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).exists():
            shutil.copy(Path(tokenizer_from) / name, out / name)
    return out


def splade_reference(path: Path):
    """sentence-transformers' SparseEncoder of the model: max over tokens of log(1 + relu(logits))."""
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    mlm = Transformer(str(path), transformer_task="fill-mask")
    return SparseEncoder(modules=[mlm, SpladePooling("max")], device="cpu")
