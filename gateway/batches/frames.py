"""A batch's answers as they are kept, and the output lines they become when a file is downloaded.

A line that succeeded is kept as a frame: its vectors as little-endian float32 (or the bytes of the
line's ``output_dtype``), after a short JSON head (its custom_id, model, tokens, encoding_format,
shape and dtype); 1.5 KB an input for 384 dimensions,
where OpenAI's JSON line takes ~5 KB (~2 KB as base64). Rendered when downloaded, by the same code
that renders ``/v1/embeddings`` (``render_embeddings``), from the same float32 values: the same bytes
a client of ``/v1/embeddings`` gets. Any other answer (a line's error, a line left unrun, or an answer
a gateway from before frames kept) is kept as its JSON line, and passes through as it is.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import orjson

from gateway.dialects.openai import render_embeddings

MAGIC = b"EQF1"  # a kept JSON line begins with "{"
HEAD = struct.Struct("<I")  # the head's length


def request_id(batch_id: str, index: int) -> str:
    return hashlib.sha256(f"{batch_id}/{index}".encode()).hexdigest()[:24]


def output_line(batch_id: str, index: int, custom_id: str, status: int, body: bytes) -> bytes:
    """OpenAI's output line; the body is spliced in as it is (it is JSON already)."""
    ident = request_id(batch_id, index)
    head = orjson.dumps({"id": f"batch_req_{ident}", "custom_id": custom_id})
    return (
        head[:-1]
        + b',"response":{"status_code":%d,"request_id":"%s","body":' % (status, ident.encode())
        + body
        + b'},"error":null}\n'
    )


def pack(custom_id: str, model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> bytes:
    rows, dims = vectors.shape
    dtype = "<f4" if vectors.dtype.kind == "f" else vectors.dtype.str  # |i1, |u1: an output_dtype's bytes
    head = orjson.dumps({"custom_id": custom_id, "model": model, "tokens": prompt_tokens, "format": encoding_format,
                         "rows": rows, "dims": dims, "dtype": dtype})  # fmt: skip
    return MAGIC + HEAD.pack(len(head)) + head + vectors.astype(dtype, copy=False).tobytes()


def render(batch_id: str, index: int, kept: bytes) -> bytes:
    """The output line of a kept answer."""
    if not kept.startswith(MAGIC):
        return kept
    (size,) = HEAD.unpack_from(kept, len(MAGIC))
    start = len(MAGIC) + HEAD.size
    head = orjson.loads(kept[start : start + size])
    dtype = head.get("dtype", "<f4")  # absent: kept before output_dtype
    vectors = np.frombuffer(kept, dtype=dtype, offset=start + size).reshape(head["rows"], head["dims"])
    body = render_embeddings(head["model"], vectors, head["tokens"], head["format"])
    return output_line(batch_id, index, head["custom_id"], 200, body)


def render_all(batch_id: str, kept: list[tuple[int, bytes]]) -> bytes:
    return b"".join(render(batch_id, index, answer) for index, answer in kept)
