"""Vectors as raw little-endian float32, never JSON floats: the one codec for results, used by
the worker's posts and by the gateway's Redis queue alike.

    uint32 LE  n        length of the JSON header
    n bytes             ResultsHeader as JSON
    rest                the float32 matrices of header.results, in order, row-major
"""

from __future__ import annotations

import struct

import numpy as np

from contract.messages import ResultsHeader


class FrameError(ValueError):
    """A results frame that does not match its own header."""


_LEN = struct.Struct("<I")


def encode_results(header: ResultsHeader, matrices: list[np.ndarray]) -> bytes:
    """Build a results frame; each matrix is (rows, dims) for the header entry at its index."""
    head = header.model_dump_json().encode()
    parts = [_LEN.pack(len(head)), head]
    parts.extend(np.ascontiguousarray(m, dtype="<f4").tobytes() for m in matrices)
    return b"".join(parts)


def decode_results(frame: bytes) -> tuple[ResultsHeader, list[np.ndarray]]:
    """Split a results frame into its header and one read-only float32 matrix per result."""
    if len(frame) < _LEN.size:
        raise FrameError("results frame is shorter than its length prefix")
    (head_len,) = _LEN.unpack_from(frame)
    body_start = _LEN.size + head_len
    if body_start > len(frame):
        raise FrameError("results frame header runs past the end of the body")
    header = ResultsHeader.model_validate_json(frame[_LEN.size : body_start])
    expected = sum(r.rows * r.dims for r in header.results) * 4
    if len(frame) - body_start != expected:
        raise FrameError(f"results frame has {len(frame) - body_start} vector bytes, header says {expected}")
    matrices, offset = [], body_start
    for r in header.results:
        count = r.rows * r.dims
        matrices.append(np.frombuffer(frame, dtype="<f4", count=count, offset=offset).reshape(r.rows, r.dims))
        offset += count * 4
    return header, matrices
