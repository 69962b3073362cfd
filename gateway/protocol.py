"""Public wire formats: what clients send and what they parse. Tolerant of unknown fields.

Errors name the field: a missing or invalid value is a 400, a value of the wrong JSON type a
422, each with ``param`` set so OpenAI-style clients can point at it.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest, WrongType
from worker.protocol import JobInput

MAX_TOKEN_ID = 2**31 - 1
_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type"}
INPUT_SHAPES = "a string, an array of strings, an array of token ids, or an array of arrays of token ids"


class EmbeddingsRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings``. ``input`` is checked by ``parse_inputs``."""

    # strict: "5" is not a number of dimensions; extra="ignore": clients send more than we read.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, gt=0)
    user: str | None = None


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_json_type(data)}")
    return data


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """Validate against a wire model; the first problem becomes a 400 or 422 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise InvalidRequest(f"'{field}' is a required field", param=field, code="missing_field") from None
        problem = f"'{field}': {err['msg']} (got {_preview(err['input'])})"
        if err["type"] in _TYPE_ERRORS:
            raise WrongType(problem, param=field) from None
        raise InvalidRequest(problem, param=field, code="invalid_value") from None


def parse_inputs(raw: Any, max_inputs: int) -> tuple[list[JobInput], bool]:
    """The inputs of a request as texts or token-id lists, and whether it was a single input."""
    if isinstance(raw, str):
        _check_text(raw, "input")
        return [raw], True
    if not isinstance(raw, list):
        raise WrongType(f"'input' must be {INPUT_SHAPES}, got {_json_type(raw)}", param="input")
    if not raw:
        raise InvalidRequest("'input' must not be an empty array", param="input", code="invalid_value")
    if all(_is_int(x) for x in raw):
        _check_ids(raw, "input")
        return [raw], True
    if len(raw) > max_inputs:
        raise InvalidRequest(
            f"'input' has {len(raw)} items; at most {max_inputs} are allowed per request",
            param="input", code="too_many_inputs",
        )
    if _is_int(raw[0]):
        bad = next(i for i, x in enumerate(raw) if not _is_int(x))
        raise WrongType(f"'input[{bad}]' must be a token id like input[0], got {_json_type(raw[bad])}", param=f"input[{bad}]")
    if not isinstance(raw[0], (str, list)):
        raise WrongType(f"'input[0]' must be a string, a token id or an array of token ids, got {_json_type(raw[0])}", param="input[0]")
    texts = isinstance(raw[0], str)
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if texts and isinstance(item, str):
            _check_text(item, where)
        elif not texts and isinstance(item, list) and all(_is_int(x) for x in item):
            _check_ids(item, where)
        else:
            expected = "a string like input[0]" if texts else "an array of token ids"
            raise WrongType(f"'{where}' must be {expected}, got {_json_type(item)}", param=where)
    return raw, False


def _check_text(text: str, where: str) -> None:
    if not text:
        raise InvalidRequest(f"'{where}' must not be an empty string", param=where, code="invalid_value")


def _check_ids(ids: list[int], where: str) -> None:
    if not ids:
        raise InvalidRequest(f"'{where}' must not be an empty array of token ids", param=where, code="invalid_value")
    for j, token in enumerate(ids):
        if not 0 <= token <= MAX_TOKEN_ID:
            raise InvalidRequest(
                f"'{where}[{j}]' is not a valid token id (got {_preview(token)})", param=where, code="invalid_value"
            )


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass, and not a token id


def _json_type(value: Any) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_embeddings(model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> bytes:
    """The OpenAI list response, from a (n, dims) float32 matrix, without per-float Python work."""
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        items = [base64.b64encode(row.tobytes()).decode() for row in little]
    else:
        items = list(vectors)  # orjson writes float32 rows in their shortest exact form
    data = [{"object": "embedding", "embedding": item, "index": i} for i, item in enumerate(items)]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def render_models(routes: dict[str, Any], created: int) -> bytes:
    data = [{"id": name, "object": "model", "created": created, "owned_by": "embedq"} for name in sorted(routes)]
    return orjson.dumps({"object": "list", "data": data})
