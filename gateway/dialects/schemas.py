"""Public wire models, OpenAI's and Ollama's: what clients send and what they parse.

Requests are tolerant (unknown fields ignored) but strict about types: a value of the wrong
JSON type is a 422, a missing or invalid one a 400, each naming its field. Response models
describe the answers for /openapi.json and for tests; handlers render answers with orjson.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import InvalidRequest, WrongType

_TYPE_ERRORS = {"string_type", "int_type", "float_type", "bool_type", "list_type", "dict_type", "model_type"}


class _Request(BaseModel):
    # strict: "5" is not a number of dimensions; extra="ignore": clients send more than we read.
    model_config = ConfigDict(extra="ignore", strict=True)


class EmbeddingsRequest(_Request):
    """OpenAI ``POST /v1/embeddings``; also what the Aleph Alpha client sends to ``/embeddings``."""

    model: str = Field(min_length=1)
    input: Any = Field(description="a string, an array of strings, an array of token ids, or an array of arrays of token ids")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        default=None, gt=0, description="a size the model supports; the vector is cut and re-normalised"
    )
    user: str | None = None
    truncate: bool | None = Field(
        default=None, description="embedq extension: cut over-long inputs instead of a 400; default per model"
    )
    tags: list[str] | None = Field(
        default=None, description="Aleph Alpha: only workers carrying all these tags serve the request"
    )
    hosting: str | None = Field(default=None, description="Aleph Alpha: accepted and ignored")


class OllamaEmbedRequest(_Request):
    """Ollama ``POST /api/embed``."""

    model: str = Field(min_length=1)
    input: Any = Field(default=None, description="a string or an array of strings")
    truncate: bool | None = Field(default=None, description="default true: cut over-long inputs; false: a 400")
    dimensions: int | None = Field(default=None, gt=0)
    keep_alive: Any = None  # accepted: workers keep their model loaded anyway
    options: dict[str, Any] | None = None  # accepted: sampling options mean nothing to an embedding


class OllamaEmbeddingsRequest(_Request):
    """Ollama's legacy ``POST /api/embeddings``."""

    model: str = ""
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int = Field(description="nanoseconds")
    load_duration: int = Field(description="nanoseconds")
    prompt_eval_count: int


class OllamaEmbeddingsResponse(BaseModel):
    embedding: list[float]


class OllamaModelDetails(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class OllamaModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(BaseModel):
    models: list[OllamaModel]


class OllamaError(BaseModel):
    error: str


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {json_type(data)}")
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
        problem = f"'{field}': {err['msg']} (got {preview(err['input'])})"
        if err["type"] in _TYPE_ERRORS:
            raise WrongType(problem, param=field) from None
        raise InvalidRequest(problem, param=field, code="invalid_value") from None


def json_type(value: Any) -> str:
    names = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
